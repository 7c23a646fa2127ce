-- A verified Stripe event of the other mode than our key's (a test event at a live api, or a
-- live one at a test api): recorded, never applied, with why.
ALTER TABLE stripe_events ADD COLUMN refused_reason TEXT;
