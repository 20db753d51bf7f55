//! Diesel's view of `migrations/`. Written by hand (there is no
//! `diesel print-schema` in the build), so keep it in step with the SQL; the
//! integration tests fail on any mismatch because every column is read.

diesel::table! {
    namespaces (name) {
        name -> Text,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    hosts (name) {
        name -> Text,
        address -> Text,
        cpus -> Int4,
        memory_mb -> Int8,
        labels -> Jsonb,
        cordoned -> Bool,
        draining -> Bool,
        registered_at -> Timestamptz,
        last_heartbeat_at -> Nullable<Timestamptz>,
        lost_at -> Nullable<Timestamptz>,
        drain_blocked -> Nullable<Text>,
        session_controller -> Nullable<Text>,
    }
}

diesel::table! {
    machines (id) {
        id -> Uuid,
        seq -> Int8,
        namespace -> Text,
        name -> Text,
        state -> Text,
        previous_state -> Nullable<Text>,
        image -> Text,
        cpus -> Int4,
        memory_mb -> Int8,
        env -> Jsonb,
        labels -> Jsonb,
        host_labels -> Jsonb,
        host_name -> Nullable<Text>,
        lease_nonce -> Nullable<Text>,
        lease_owner -> Nullable<Text>,
        lease_description -> Nullable<Text>,
        lease_expires_at -> Nullable<Timestamptz>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        command -> Jsonb,
        drain_restart -> Bool,
        ssh_keys -> Jsonb,
        from_snapshot -> Nullable<Text>,
        branch_of -> Nullable<Uuid>,
    }
}

diesel::table! {
    snapshots (id) {
        id -> Text,
        seq -> Int8,
        namespace -> Text,
        machine_id -> Uuid,
        host_name -> Text,
        name -> Nullable<Text>,
        kind -> Text,
        cpus -> Int4,
        memory_mb -> Int8,
        memory_bytes -> Int8,
        disk_bytes -> Int8,
        pause_us -> Int8,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    snapshot_idempotency_keys (namespace, key) {
        namespace -> Text,
        key -> Text,
        request_sha256 -> Text,
        snapshot_id -> Nullable<Text>,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    machine_events (id) {
        id -> Int8,
        machine_id -> Uuid,
        state -> Text,
        previous_state -> Nullable<Text>,
        reason -> Text,
        at -> Timestamptz,
    }
}

diesel::table! {
    idempotency_keys (namespace, key) {
        namespace -> Text,
        key -> Text,
        request_sha256 -> Text,
        machine_id -> Uuid,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    fork_idempotency_keys (namespace, key) {
        namespace -> Text,
        key -> Text,
        request_sha256 -> Text,
        machine_ids -> Array<Uuid>,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    api_tokens (jti) {
        jti -> Text,
        subject -> Text,
        roles -> Jsonb,
        cluster_admin -> Bool,
        description -> Text,
        created_by -> Text,
        created_at -> Timestamptz,
        expires_at -> Timestamptz,
    }
}

diesel::table! {
    revoked_tokens (jti) {
        jti -> Text,
        revoked_by -> Text,
        revoked_at -> Timestamptz,
    }
}

diesel::table! {
    namespace_quotas (namespace) {
        namespace -> Text,
        machines -> Nullable<Int8>,
        vcpus -> Nullable<Int8>,
        memory_mb -> Nullable<Int8>,
        snapshot_bytes -> Nullable<Int8>,
        updated_at -> Timestamptz,
    }
}

diesel::joinable!(machines -> namespaces (namespace));
diesel::joinable!(machines -> hosts (host_name));
diesel::joinable!(machine_events -> machines (machine_id));
diesel::joinable!(snapshots -> machines (machine_id));
diesel::allow_tables_to_appear_in_same_query!(
    namespaces,
    namespace_quotas,
    hosts,
    machines,
    machine_events,
    snapshots,
    snapshot_idempotency_keys,
    idempotency_keys,
    fork_idempotency_keys,
    api_tokens,
    revoked_tokens
);
