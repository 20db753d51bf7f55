-- authorized_keys lines for the guest's SSH server (mm-init's), as a JSON
-- array of strings; `mmctl --server ssh` logs in with one of them.
ALTER TABLE machines ADD COLUMN ssh_keys JSONB NOT NULL DEFAULT '[]';
