-- The controller's whole desired state. Every table is written only by
-- controllers (brokers will report through the controller), so constraints
-- here are the last line of defence, not the validation users see.

CREATE TABLE namespaces (
    name TEXT PRIMARY KEY CHECK (name ~ '^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$'),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One row per broker. Until brokers register over mTLS, rows come from the
-- admin-only POST /v1/hosts stand-in.
CREATE TABLE hosts (
    name TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    cpus INTEGER NOT NULL CHECK (cpus > 0),
    memory_mb BIGINT NOT NULL CHECK (memory_mb > 0),
    labels JSONB NOT NULL DEFAULT '{}',
    cordoned BOOLEAN NOT NULL DEFAULT false,
    draining BOOLEAN NOT NULL DEFAULT false,
    registered_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_heartbeat_at TIMESTAMPTZ
);

CREATE TABLE machines (
    id UUID PRIMARY KEY,
    -- Insertion order, the key of cursor pagination (ids are random).
    seq BIGSERIAL NOT NULL UNIQUE,
    namespace TEXT NOT NULL REFERENCES namespaces (name) ON DELETE CASCADE,
    name TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('created', 'starting', 'started', 'stopping', 'stopped', 'failed', 'destroying', 'destroyed')),
    previous_state TEXT CHECK (previous_state IN ('created', 'starting', 'started', 'stopping', 'stopped', 'failed', 'destroying', 'destroyed')),
    image TEXT NOT NULL,
    cpus INTEGER NOT NULL CHECK (cpus > 0),
    memory_mb BIGINT NOT NULL CHECK (memory_mb > 0),
    env JSONB NOT NULL DEFAULT '{}',
    labels JSONB NOT NULL DEFAULT '{}',
    -- Placement constraints: labels the host must carry.
    host_labels JSONB NOT NULL DEFAULT '{}',
    host_name TEXT REFERENCES hosts (name),
    lease_nonce TEXT,
    lease_owner TEXT,
    lease_description TEXT,
    lease_expires_at TIMESTAMPTZ,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- Names are unique among the living; a destroyed machine frees its name.
CREATE UNIQUE INDEX machines_namespace_name ON machines (namespace, name) WHERE state <> 'destroyed';
CREATE INDEX machines_namespace_seq ON machines (namespace, seq);
CREATE INDEX machines_host ON machines (host_name) WHERE state <> 'destroyed';

-- Every state transition, so previous_state is never the only history.
CREATE TABLE machine_events (
    id BIGSERIAL PRIMARY KEY,
    machine_id UUID NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
    state TEXT NOT NULL,
    previous_state TEXT,
    reason TEXT NOT NULL,
    at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX machine_events_machine ON machine_events (machine_id, id);

-- Written in the same transaction as the machine it created, so a retried
-- request after a crash sees either both or neither.
CREATE TABLE idempotency_keys (
    namespace TEXT NOT NULL REFERENCES namespaces (name) ON DELETE CASCADE,
    key TEXT NOT NULL,
    request_sha256 TEXT NOT NULL,
    machine_id UUID NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, key)
);

-- Tokens this controller minted (the JWT itself is never stored).
CREATE TABLE api_tokens (
    jti TEXT PRIMARY KEY,
    subject TEXT NOT NULL,
    roles JSONB NOT NULL,
    cluster_admin BOOLEAN NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    created_by TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at TIMESTAMPTZ NOT NULL
);

-- Any token id, minted here or by an external issuer (RS256), can be revoked.
CREATE TABLE revoked_tokens (
    jti TEXT PRIMARY KEY,
    revoked_by TEXT NOT NULL,
    revoked_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
