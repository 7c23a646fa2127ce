-- What each reconciler pass found and did.
CREATE TABLE reconcile_runs (
    id            BIGSERIAL PRIMARY KEY,
    started_at    TIMESTAMPTZ NOT NULL,
    finished_at   TIMESTAMPTZ NOT NULL,
    removed       JSONB NOT NULL,
    reprovisioned JSONB NOT NULL
);
