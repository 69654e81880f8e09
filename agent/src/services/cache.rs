//! A per-app Redis-compatible cache (being written).
