//! The net back end (being written).
