//! End-to-end tests: the real `paysync` binary against the bundled mock server on
//! 127.0.0.1 (port 0), with real config files, SQLite state and output on disk.

mod core;
mod daemon;
mod genauth;
mod hardening;
mod settle;
mod util;
mod warehouse;
