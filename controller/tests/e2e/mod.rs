//! Parts of `e2e_brokers.rs` kept in their own files.

pub mod mmctl;
pub mod snapshots;
