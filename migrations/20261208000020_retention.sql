-- Retention (`HIVE_RETENTION_DAYS`): the worker prunes old rows in small batches. These
-- tables are appended in time order, so a BRIN index (a few pages) finds the old rows without
-- costing the writes a B-tree would.
CREATE INDEX node_events_at ON node_events USING brin (at);
CREATE INDEX stripe_events_received_at ON stripe_events USING brin (received_at);
CREATE INDEX reconcile_runs_started_at ON reconcile_runs USING brin (started_at);

-- Usage reads a node's moves by period: its moves within the period, and its last move before.
CREATE INDEX node_events_transitions ON node_events (node_id, at) WHERE kind = 'transition';
