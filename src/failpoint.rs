//! Crash and delay points for tests: when the environment variable
//! `PAYSYNC_FAILPOINT` names a point, the process kills itself with a real SIGKILL
//! there (crash points) or stalls there for a while (delay points). Unset (always,
//! in production), each check is one environment lookup at a handful of places per
//! export or ingest turn, never per row.
//!
//! Crash points: `after-first-record` (while fetching), `mid-write` (data file half
//! written), `after-data-rename` (data file in place, no manifest yet),
//! `before-batch-commit` (manifest written, state not yet told),
//! `after-ingest-commit` (daemon: a queue offset saved, or an inbox file moved to
//! `done/`, before the ingest's rejects file is published).
//!
//! Delay points: `slow-ingest` (each daemon ingest turn takes [`SLOW`] longer, so
//! a test can see the next turn skipped without depending on how fast ingest is).

/// The environment variable naming the crash point.
pub const ENV: &str = "PAYSYNC_FAILPOINT";

/// Whether `name` is the configured crash point.
pub fn armed(name: &str) -> bool {
    std::env::var_os(ENV).is_some_and(|v| v == name)
}

/// Dies by SIGKILL here if `name` is the configured crash point.
pub fn hit(name: &str) {
    if armed(name) {
        kill_self();
    }
}

/// How long a delay point stalls.
pub const SLOW: std::time::Duration = std::time::Duration::from_millis(2500);

/// Stalls the calling (blocking) thread for [`SLOW`] if `name` is the configured
/// delay point.
pub fn delay(name: &str) {
    if armed(name) {
        std::thread::sleep(SLOW);
    }
}

/// Sends SIGKILL to this process (through kill(1): the crate forbids unsafe code)
/// and waits for it to land.
pub fn kill_self() -> ! {
    let pid = std::process::id().to_string();
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &pid])
        .status();
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}
