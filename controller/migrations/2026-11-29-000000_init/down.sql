DROP TABLE revoked_tokens;
DROP TABLE api_tokens;
DROP TABLE idempotency_keys;
DROP TABLE machine_events;
DROP TABLE machines;
DROP TABLE hosts;
DROP TABLE namespaces;
