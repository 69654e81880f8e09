//! The shared PostgreSQL server (being written).
