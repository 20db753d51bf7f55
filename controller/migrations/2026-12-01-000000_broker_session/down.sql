ALTER TABLE machines DROP COLUMN command;
ALTER TABLE hosts DROP COLUMN lost_at;
