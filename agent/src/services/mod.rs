//! Shared services the agent runs for apps that ask for them in their manifest: one
//! PostgreSQL server for all apps (`postgres`) and a small cache server per app (`cache`).

pub mod cache;
pub mod postgres;
