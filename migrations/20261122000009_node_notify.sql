-- Every move of a node is announced on `hive_node_changed` (the node id as payload, sent when
-- the moving transaction commits), so that the api's waiters wake on it instead of polling.
CREATE OR REPLACE FUNCTION hive_guard_node_transition() RETURNS trigger
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
    PERFORM pg_notify('hive_node_changed', NEW.id::text);
    RETURN NEW;
END
$$;
