-- Intent kept apart from what the workflows have done, as Neon's storage controller does.
-- `desired` and the spec (`instance_type`, `volume_gb`, `restarts_requested`) are what the
-- subscription, the app or the operator last asked for; `state` and the `applied_*` columns are
-- where the node's workflows stand. The worker acts on the difference whenever a node rests, so
-- a request that arrives mid-step interrupts nothing and the latest one wins.
ALTER TABLE nodes
    ADD COLUMN desired TEXT NOT NULL DEFAULT 'running'
        CONSTRAINT nodes_desired CHECK (desired IN ('running', 'suspended', 'gone')),
    ADD COLUMN volume_gb INT NOT NULL DEFAULT 16,
    ADD COLUMN applied_instance_type TEXT,
    ADD COLUMN applied_volume_gb INT,
    ADD COLUMN restarts_requested INT NOT NULL DEFAULT 0,
    ADD COLUMN restarts_done INT NOT NULL DEFAULT 0,
    -- Why a step is waiting ("instance is pending"), and the last transient error before a
    -- retry: neither is a failure, so neither is in `error`.
    ADD COLUMN waiting_for TEXT,
    ADD COLUMN last_error TEXT;

UPDATE nodes SET applied_instance_type = instance_type, applied_volume_gb = 16
WHERE instance_id IS NOT NULL;

-- `error` used to hold waits and transient errors too.
UPDATE nodes SET last_error = error, error = NULL
WHERE error IS NOT NULL AND state <> 'failed'
  AND teardown_reason IS DISTINCT FROM 'provisioning_failed';
