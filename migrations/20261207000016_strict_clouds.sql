-- What the clouds' eventual consistency needs a node to remember between looks.
-- route53_change_id: the change its UPSERT made; Route 53 answers every change PENDING and
--   reports INSYNC only through GetChange of that id.
-- launch_token: the ClientToken of the launch attempt under way, written before RunInstances;
--   a retry repeats that attempt (same zone, type and token) instead of starting over in a
--   zone that had no capacity before and launching a second instance.
-- instance_launched_at: when its instance was recorded; EC2 may not know an id that young
--   (InvalidInstanceID.NotFound), which is then no proof that the instance is gone.
ALTER TABLE nodes
    ADD COLUMN route53_change_id text,
    ADD COLUMN launch_token text,
    ADD COLUMN instance_launched_at timestamptz;
