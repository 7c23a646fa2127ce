-- Call budgets per provider (and region, for the regional AWS services), shared by every
-- worker: a token bucket whose state lives here, so that the sum of all workers' calls stays
-- under the provider's rate limit. `tokens` refills at the budget's rate up to its burst; a
-- rate limit answer that still arrives sets it below zero (the wait it asked for) and halves
-- the rate until `shrunk_until`.
CREATE TABLE rate_budgets (
    name TEXT PRIMARY KEY,
    tokens DOUBLE PRECISION NOT NULL,
    refreshed_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    shrunk_until TIMESTAMPTZ
);
