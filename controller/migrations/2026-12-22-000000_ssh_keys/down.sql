ALTER TABLE machines DROP COLUMN ssh_keys;
