ALTER TABLE hosts DROP COLUMN session_controller;
