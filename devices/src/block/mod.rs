//! The block back end (being written).
