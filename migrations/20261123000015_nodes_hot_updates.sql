-- A step's commit changes a node's state and its lease, never a column of an index but this
-- one: the btree on `state` made each of a node's ten commits write a new entry in all five of
-- the table's indexes (no heap-only update). No statement needs it: the stall sweep, the
-- reconciler (most nodes are `ready`) and the counts read every row anyway; an operator's
-- `hivectl nodes --state failed` reads the table once. Room left on each page keeps the new
-- version of a row on its own page, which a heap-only update needs.
DROP INDEX nodes_state;
ALTER TABLE nodes SET (fillfactor = 80);

-- The request-id trigger ran a PL/pgSQL function on every write of a node (every lease, every
-- commit of the worker, which never sets a request id): ask the setting first, in the
-- trigger's own condition, and call the function only when an api request named itself.
DROP TRIGGER nodes_take_request_id ON nodes;
CREATE TRIGGER nodes_take_request_id BEFORE INSERT OR UPDATE ON nodes
    FOR EACH ROW
    WHEN (current_setting('hive.request_id', true) <> '')
    EXECUTE FUNCTION nodes_take_request_id();
