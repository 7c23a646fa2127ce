-- A node its user stopped (`desired = 'stopped'`, state `stopped`) is told apart from one that
-- billing suspended: only the user starts it again, and billing leaves it as it is.
ALTER TABLE nodes DROP CONSTRAINT nodes_desired;
ALTER TABLE nodes ADD CONSTRAINT nodes_desired
    CHECK (desired IN ('running', 'suspended', 'stopped', 'gone'));
