-- The legal moves of the node state machine, and a guard that admits no other. The rows are
-- written by every binary at start from the one table in the code (`NodeState::may_become`),
-- so whoever changes a node's state (worker, api, operator, reconciler) goes through the same
-- check, and every move lands in the node's log.
CREATE TABLE node_transitions (
    from_state TEXT NOT NULL,
    to_state   TEXT NOT NULL,
    PRIMARY KEY (from_state, to_state)
);

CREATE FUNCTION hive_guard_node_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM node_transitions WHERE from_state = OLD.state AND to_state = NEW.state
    ) THEN
        RAISE EXCEPTION 'illegal node transition: % -> %', OLD.state, NEW.state
            USING ERRCODE = 'check_violation';
    END IF;
    INSERT INTO node_events (node_id, generation, step, kind, detail)
    VALUES (NEW.id, NEW.generation, NEW.state, 'transition', OLD.state || ' -> ' || NEW.state);
    RETURN NEW;
END
$$;

CREATE TRIGGER nodes_guard_transition
    BEFORE UPDATE OF state ON nodes
    FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION hive_guard_node_transition();
