-- A token take is one cloud call's permission, worth nothing after a crash: keep the buckets
-- out of the WAL. A transaction that wrote only unlogged tables commits without waiting for
-- a WAL flush (PostgreSQL's RecordTransactionCommit), so a cloud call no longer waits for a
-- disk flush before it starts. After a crash, or on a promoted standby, the table is empty:
-- each bucket is made again, full, by its next take (`store::take_budget`), and a halved rate
-- after a rate-limit answer is forgotten; the provider's next 429 halves it again.
ALTER TABLE rate_budgets SET UNLOGGED;
