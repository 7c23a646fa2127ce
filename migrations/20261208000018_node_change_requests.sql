-- Each node creation or deletion a user's own request made, for `HIVE_NODE_CHANGES_PER_HOUR`:
-- a user cannot launch and delete real instances in a loop, spending the rate budgets every
-- tenant shares. Rows older than an hour are deleted as the user's next change is counted.
CREATE TABLE node_change_requests (
    user_id TEXT NOT NULL,
    at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX node_change_requests_user_at ON node_change_requests (user_id, at);
