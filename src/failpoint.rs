//! Crash points for the crash-safety tests: when the environment variable
//! `PAYSYNC_FAILPOINT` names a point, the process kills itself with a real SIGKILL
//! there. Unset (always, in production), each check is one environment lookup at a
//! handful of places per export, never per row.
//!
//! Points: `after-first-record` (while fetching), `mid-write` (data file half
//! written), `after-data-rename` (data file in place, no manifest yet),
//! `before-batch-commit` (manifest written, state not yet told).

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
