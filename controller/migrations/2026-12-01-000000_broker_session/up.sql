-- Brokers register over their mTLS session now. A host whose broker stops
-- heart-beating is marked lost by the leading controller (and placement
-- skips it) until its broker registers or heart-beats again.
ALTER TABLE hosts ADD COLUMN lost_at TIMESTAMPTZ;

-- The workload's argv (empty: the image's default), passed to the broker's
-- createVm.
ALTER TABLE machines ADD COLUMN command JSONB NOT NULL DEFAULT '[]';
