-- The URL (the controller's --advertise-url) of the controller that holds
-- the host's broker session, so that every other controller can forward
-- exec and logs there. Written by that controller when the broker
-- registers, cleared when the session ends (only while it still names
-- that controller); NULL when no controller holds a session, or the one
-- that does has no URL its peers can reach.
ALTER TABLE hosts ADD COLUMN session_controller TEXT;
