DROP TABLE fork_idempotency_keys;
ALTER TABLE machines DROP COLUMN branch_of;
