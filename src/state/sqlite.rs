//! (module being written)
pub struct SqliteStore;
