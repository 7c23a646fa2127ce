-- Why a node is being torn down: the subscription ended, or its provisioning failed and is
-- being undone. NULL while it is not.
ALTER TABLE nodes ADD COLUMN teardown_reason TEXT;

-- Subscriptions Stripe has ended, kept even when the checkout that would create them has not
-- arrived yet (Stripe delivers in no particular order), so a late checkout provisions nothing.
CREATE TABLE ended_subscriptions (
    stripe_subscription_id TEXT PRIMARY KEY,
    stripe_event_id        TEXT NOT NULL REFERENCES stripe_events (id),
    ended_at               TIMESTAMPTZ NOT NULL DEFAULT now()
);
