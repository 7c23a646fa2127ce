-- A scheduled pass claims its tick: of several workers woken by the same tick, the one whose
-- insert wins runs the pass. A pass that died shows no finished_at.
ALTER TABLE reconcile_runs
    ADD COLUMN tick TIMESTAMPTZ UNIQUE,
    ADD COLUMN error TEXT,
    ALTER COLUMN finished_at DROP NOT NULL;
