-- Drain moves machines that have run. A running machine is first stopped
-- on its draining host; this remembers that it is to be started again on
-- the host it moves to (a user's own start, stop or delete clears it).
ALTER TABLE machines ADD COLUMN drain_restart BOOLEAN NOT NULL DEFAULT false;

-- Why a draining host still holds machines (no other host has room for
-- them), as of the leader's last pass; shown by the hosts API.
ALTER TABLE hosts ADD COLUMN drain_blocked TEXT;
