-- Snapshots of machines, as their brokers took them (issue 13). The id is
-- the broker's own snapshot id; the files stay on that host, so the host is
-- kept here, and every listing is answered from this table (no broker round
-- trip) with the namespace checked like a machine's. A row is written once
-- the broker has the snapshot, and deleted once the broker removed it.
CREATE TABLE snapshots (
    id TEXT PRIMARY KEY,
    -- Listing order (ids are random).
    seq BIGSERIAL NOT NULL UNIQUE,
    namespace TEXT NOT NULL REFERENCES namespaces (name) ON DELETE CASCADE,
    machine_id UUID NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
    host_name TEXT NOT NULL REFERENCES hosts (name),
    -- The user's name for it, unique in its namespace; never sent to the
    -- broker, whose names are host-wide and would let tenants collide.
    name TEXT,
    kind TEXT NOT NULL CHECK (kind IN ('snapshot', 'suspend')),
    -- The machine's shape when it was taken (a restore has it too).
    cpus INTEGER NOT NULL CHECK (cpus > 0),
    memory_mb BIGINT NOT NULL CHECK (memory_mb > 0),
    -- Guest RAM saved (zero and untouched pages left out), space on the
    -- host's disk, and how long the guest stood still for it.
    memory_bytes BIGINT NOT NULL CHECK (memory_bytes >= 0),
    disk_bytes BIGINT NOT NULL CHECK (disk_bytes >= 0),
    pause_us BIGINT NOT NULL CHECK (pause_us >= 0),
    created_at TIMESTAMPTZ NOT NULL
);
CREATE UNIQUE INDEX snapshots_namespace_name ON snapshots (namespace, name) WHERE name IS NOT NULL;
CREATE INDEX snapshots_namespace_seq ON snapshots (namespace, seq);
CREATE INDEX snapshots_machine_seq ON snapshots (machine_id, seq);

-- Idempotency-Key for snapshot creates. The broker's snapshot cannot share
-- a transaction with the row, so the key is reserved first (snapshot_id
-- NULL: in flight), then filled in with the row; a failed attempt frees it.
CREATE TABLE snapshot_idempotency_keys (
    namespace TEXT NOT NULL REFERENCES namespaces (name) ON DELETE CASCADE,
    key TEXT NOT NULL,
    request_sha256 TEXT NOT NULL,
    snapshot_id TEXT REFERENCES snapshots (id) ON DELETE CASCADE,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, key)
);

-- A machine created from a snapshot: its host's broker restores it
-- (restoreVm) instead of booting it (createVm). No foreign key: the
-- snapshot may be deleted later; a move to another host clears it.
ALTER TABLE machines ADD COLUMN from_snapshot TEXT;

-- Suspend: two more states.
ALTER TABLE machines DROP CONSTRAINT machines_state_check;
ALTER TABLE machines ADD CONSTRAINT machines_state_check CHECK (state IN
    ('created', 'starting', 'started', 'stopping', 'stopped', 'failed', 'suspending', 'suspended', 'destroying', 'destroyed'));
ALTER TABLE machines DROP CONSTRAINT machines_previous_state_check;
ALTER TABLE machines ADD CONSTRAINT machines_previous_state_check CHECK (previous_state IN
    ('created', 'starting', 'started', 'stopping', 'stopped', 'failed', 'suspending', 'suspended', 'destroying', 'destroyed'));
