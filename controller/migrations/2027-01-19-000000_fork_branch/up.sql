-- Branches and forks (issue 14). A branch is a new machine whose microVM
-- its host's broker makes as a live copy of machine `branch_of`, running
-- on the same host (`Vm.branch` on the source instead of createVm). The
-- source's row is never deleted while its namespace lives (destroyed rows
-- stay), so a foreign key holds; a move to another host clears it (the
-- machine then boots from its image where it lands).
ALTER TABLE machines ADD COLUMN branch_of UUID REFERENCES machines (id) ON DELETE SET NULL;

-- Idempotency-Key for forks (N machines from one snapshot in one
-- request). Written in the same transaction as the machines, as
-- idempotency_keys is for single creates; the machines in fork order.
CREATE TABLE fork_idempotency_keys (
    namespace TEXT NOT NULL REFERENCES namespaces (name) ON DELETE CASCADE,
    key TEXT NOT NULL,
    request_sha256 TEXT NOT NULL,
    machine_ids UUID[] NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, key)
);
