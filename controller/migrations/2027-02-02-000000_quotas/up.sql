-- Per-namespace quotas (issue 16). A namespace without a row, or a NULL
-- column, has no limit on that resource. Limits are at least 1: the API
-- refuses 0 (a namespace that may hold nothing is one to delete), and the
-- CHECKs keep the rule whoever writes the row.
CREATE TABLE namespace_quotas (
    namespace TEXT PRIMARY KEY REFERENCES namespaces (name) ON DELETE CASCADE,
    machines BIGINT CHECK (machines > 0),
    vcpus BIGINT CHECK (vcpus > 0),
    memory_mb BIGINT CHECK (memory_mb > 0),
    snapshot_bytes BIGINT CHECK (snapshot_bytes > 0),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
