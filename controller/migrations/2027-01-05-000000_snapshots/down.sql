ALTER TABLE machines DROP CONSTRAINT machines_previous_state_check;
ALTER TABLE machines ADD CONSTRAINT machines_previous_state_check CHECK (previous_state IN
    ('created', 'starting', 'started', 'stopping', 'stopped', 'failed', 'destroying', 'destroyed'));
ALTER TABLE machines DROP CONSTRAINT machines_state_check;
ALTER TABLE machines ADD CONSTRAINT machines_state_check CHECK (state IN
    ('created', 'starting', 'started', 'stopping', 'stopped', 'failed', 'destroying', 'destroyed'));
ALTER TABLE machines DROP COLUMN from_snapshot;
DROP TABLE snapshot_idempotency_keys;
DROP TABLE snapshots;
