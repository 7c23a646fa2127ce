-- The request that last asked something of a node (an api request's X-Request-Id), so that
-- the worker's log lines of the steps it causes carry the same id. The api names its request
-- in a transaction setting (`SET LOCAL hive.request_id`); any insert or update of a node in
-- that transaction takes it, whichever code path made the change. The worker's own writes set
-- nothing and leave it as it is.
ALTER TABLE nodes ADD COLUMN request_id TEXT;

CREATE FUNCTION nodes_take_request_id() RETURNS trigger AS $$
DECLARE
    asked TEXT := current_setting('hive.request_id', true);
BEGIN
    IF asked IS NOT NULL AND asked <> '' THEN
        NEW.request_id := asked;
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER nodes_take_request_id BEFORE INSERT OR UPDATE ON nodes
    FOR EACH ROW EXECUTE FUNCTION nodes_take_request_id();
