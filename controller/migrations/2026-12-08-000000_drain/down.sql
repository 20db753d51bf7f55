ALTER TABLE hosts DROP COLUMN drain_blocked;
ALTER TABLE machines DROP COLUMN drain_restart;
