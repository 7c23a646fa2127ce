-- Where a node's instance landed, and whether it is there in place of what the node asked:
-- a launch that met `InsufficientInstanceCapacity` moves to the region's next subnet (zone),
-- then to the plan's fallback types. `fallback_type` is the type it runs as in place of
-- `fallback_for`; a later resize converges on the node's type as usual (the pair only keeps
-- the resize workflow from undoing the fallback at once).
ALTER TABLE nodes
    ADD COLUMN placement TEXT,
    ADD COLUMN fallback_type TEXT,
    ADD COLUMN fallback_for TEXT;
