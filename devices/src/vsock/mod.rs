//! The vsock back end (being written).
