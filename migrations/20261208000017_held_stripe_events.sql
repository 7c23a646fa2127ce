-- A verified Stripe event we cannot apply yet (a plan or price nobody configured, a region not
-- served) is recorded all the same, held with why: applied by itself once the configuration
-- allows it (at the api's start, or by `hivectl stripe-events reprocess`), so that nothing is
-- lost when Stripe's retries end.
ALTER TABLE stripe_events
    ADD COLUMN held_reason TEXT,
    ADD COLUMN held_since TIMESTAMPTZ;

CREATE INDEX stripe_events_held ON stripe_events (received_at) WHERE held_reason IS NOT NULL;
