-- The app's Idempotency-Key: a POST or DELETE repeated with the same key (per user, within 24
-- hours) gets the first answer again; the same key with another request is refused. A row with
-- no status is a request still in progress.
CREATE TABLE idempotency_keys (
    user_id     TEXT NOT NULL,
    key         TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    status      INT,
    body        BYTEA,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, key)
);
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
