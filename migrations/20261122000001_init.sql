-- Our schema. apalis-postgres keeps its queue in its own `apalis` schema.

-- Every Stripe event we accepted, by Stripe's id: the table that makes redelivery harmless.
CREATE TABLE stripe_events (
    id          TEXT PRIMARY KEY,
    event_type  TEXT NOT NULL,
    api_version TEXT,
    livemode    BOOLEAN NOT NULL,
    payload     JSONB NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE subscriptions (
    id                     UUID PRIMARY KEY,
    stripe_subscription_id TEXT NOT NULL UNIQUE,
    stripe_customer_id     TEXT,
    user_id                TEXT NOT NULL,
    plan                   TEXT NOT NULL,
    region                 TEXT NOT NULL,
    status                 TEXT NOT NULL DEFAULT 'active',
    stripe_event_id        TEXT NOT NULL REFERENCES stripe_events (id),
    created_at             TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at             TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX subscriptions_user_id ON subscriptions (user_id);

-- One row per node: its step, what has been created for it so far, and who may work on it.
CREATE TABLE nodes (
    id                UUID PRIMARY KEY,
    subscription_id   UUID NOT NULL REFERENCES subscriptions (id),
    ordinal           INT NOT NULL,
    user_id           TEXT NOT NULL,
    region            TEXT NOT NULL,
    instance_type     TEXT NOT NULL,
    hostname          TEXT NOT NULL UNIQUE,
    state             TEXT NOT NULL DEFAULT 'pending',
    generation        INT NOT NULL DEFAULT 0,
    tunnel_id         TEXT,
    secret_arn        TEXT,
    instance_id       TEXT,
    dns_record_id     TEXT,
    error             TEXT,
    failed_step       TEXT,
    -- attempts of the current step (transient failures and polls), reset when the step changes
    attempt           INT NOT NULL DEFAULT 0,
    step_started_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    next_run_at       TIMESTAMPTZ,
    -- a short lease so that two workers never run a step of the same node at once
    lease_owner       UUID,
    lease_expires_at  TIMESTAMPTZ,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (subscription_id, ordinal)
);
CREATE INDEX nodes_user_id ON nodes (user_id, created_at);
CREATE INDEX nodes_state ON nodes (state);

-- Append-only history of every step of every node.
CREATE TABLE node_events (
    id         BIGSERIAL PRIMARY KEY,
    node_id    UUID NOT NULL REFERENCES nodes (id),
    generation INT NOT NULL,
    step       TEXT NOT NULL,
    kind       TEXT NOT NULL,
    detail     TEXT,
    at         TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX node_events_node_id ON node_events (node_id, id);
