-- A subscription keeps the latest Stripe snapshot it applied, so that an older one never
-- overwrites a newer one whatever order Stripe delivers in. Status and items are kept apart
-- because invoices speak of the status only. `*_at` is Stripe's time (the event's `created`,
-- seconds); `*_rank` breaks ties between snapshots of the same second the same way in every
-- order.
ALTER TABLE subscriptions
    ALTER COLUMN user_id DROP NOT NULL,
    ALTER COLUMN plan DROP NOT NULL,
    ALTER COLUMN region DROP NOT NULL,
    ADD COLUMN stripe_status TEXT,
    ADD COLUMN status_at BIGINT,
    ADD COLUMN status_rank INT,
    ADD COLUMN items_at BIGINT,
    ADD COLUMN quantity INT NOT NULL DEFAULT 1,
    ADD COLUMN price_id TEXT,
    ADD COLUMN past_due_since TIMESTAMPTZ,
    ADD COLUMN cancel_at TIMESTAMPTZ,
    ADD COLUMN current_period_start TIMESTAMPTZ,
    ADD COLUMN current_period_end TIMESTAMPTZ,
    -- The node count last applied from the plan: the plan is a ceiling that the checkout (or
    -- a plan change) fills; the app's own deletions are not refilled by every event.
    ADD COLUMN nodes_entitled INT,
    -- Every status snapshot applied, as [Stripe time, tie rank, status], oldest first: how
    -- long it has been past due is read off it, whatever order the snapshots came in.
    ADD COLUMN status_history JSONB NOT NULL DEFAULT '[]';

-- Subscriptions from before: what their checkout said (time 0), and the nodes they have.
-- Ranks are the order of `StripeStatus::ALL`: active 1, canceled 7.
UPDATE subscriptions SET
    stripe_status = CASE WHEN status = 'ended' THEN 'canceled' ELSE 'active' END,
    status_rank = CASE WHEN status = 'ended' THEN 7 ELSE 1 END,
    status_at = 0, items_at = 0,
    nodes_entitled = (SELECT count(*) FROM nodes WHERE nodes.subscription_id = subscriptions.id);
UPDATE subscriptions SET status_history = jsonb_build_array(jsonb_build_array(0, status_rank, stripe_status));

-- A subscription that ended before its checkout arrived is now a row of its own, canceled and
-- not yet bound to a user; the separate table goes.
INSERT INTO subscriptions (id, stripe_subscription_id, stripe_event_id, status, stripe_status,
                           status_at, status_rank, status_history)
SELECT gen_random_uuid(), e.stripe_subscription_id, e.stripe_event_id, 'ended', 'canceled',
       extract(epoch FROM e.ended_at)::bigint, 7,
       jsonb_build_array(jsonb_build_array(extract(epoch FROM e.ended_at)::bigint, 7, 'canceled'))
FROM ended_subscriptions e
ON CONFLICT (stripe_subscription_id) DO NOTHING;
DROP TABLE ended_subscriptions;

-- A past-due subscription's nodes keep running until this moment, then the worker suspends
-- them on its own (no further event needed).
ALTER TABLE nodes ADD COLUMN suspend_at TIMESTAMPTZ;
