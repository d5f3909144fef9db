//! The systemd units in `systemd/`: the daemon and export services carry the hardening
//! the README promises, `systemd-analyze verify` accepts all three units, and
//! `systemd-analyze security --offline=yes` rates both services at exposure 2.0 or
//! lower.
//!
//! The text checks always run. The `systemd-analyze` checks run when the tool is on
//! `PATH` (Debian: `apt-get install -y systemd`); otherwise they print a `skipped:` line
//! to stderr and pass. They work on temporary copies of the units in which the
//! installed binary path is replaced by the freshly built `paysync`, because `verify`
//! refuses an `ExecStart=` whose binary does not exist.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Where the units expect the binary (see `systemd/README.md`).
const INSTALLED_BINARY: &str = "/usr/local/bin/paysync";
/// The unit files, by file name, in the order `verify` gets them.
const UNITS: [&str; 3] = [
    "paysync.service",
    "paysync-export.service",
    "paysync-export.timer",
];
/// The two services that `systemd-analyze security` must rate.
const SERVICES: [&str; 2] = ["paysync.service", "paysync-export.service"];
/// Highest accepted "Overall exposure level" (0.0 safest .. 10.0 most exposed).
const MAX_EXPOSURE: f64 = 2.0;
/// `systemd-analyze security --offline` exists since systemd 250.
const MIN_SYSTEMD_FOR_OFFLINE_SECURITY: u32 = 250;

/// Sandboxing directives both services must set, with their exact values.
const HARDENING: &[(&str, &str)] = &[
    ("DynamicUser", "yes"),
    ("User", "paysync"),
    ("StateDirectory", "paysync"),
    ("StateDirectoryMode", "0750"),
    ("ConfigurationDirectory", "paysync"),
    ("WorkingDirectory", "/var/lib/paysync"),
    (
        "LoadCredential",
        "payprotocol-secret:/etc/paysync/payprotocol-secret",
    ),
    ("UMask", "0077"),
    ("ProtectSystem", "strict"),
    ("ProtectHome", "yes"),
    ("PrivateTmp", "yes"),
    ("PrivateDevices", "yes"),
    ("DevicePolicy", "closed"),
    ("PrivateUsers", "yes"),
    ("PrivateMounts", "yes"),
    ("PrivateIPC", "yes"),
    ("RemoveIPC", "yes"),
    ("NoNewPrivileges", "yes"),
    ("CapabilityBoundingSet", ""),
    ("AmbientCapabilities", ""),
    ("RestrictSUIDSGID", "yes"),
    ("ProtectKernelTunables", "yes"),
    ("ProtectKernelModules", "yes"),
    ("ProtectKernelLogs", "yes"),
    ("ProtectControlGroups", "yes"),
    ("ProtectClock", "yes"),
    ("ProtectHostname", "yes"),
    ("ProtectProc", "invisible"),
    ("ProcSubset", "pid"),
    ("RestrictNamespaces", "yes"),
    ("RestrictRealtime", "yes"),
    ("LockPersonality", "yes"),
    ("MemoryDenyWriteExecute", "yes"),
    ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
    ("SystemCallArchitectures", "native"),
    ("SystemCallErrorNumber", "EPERM"),
];

/// One unit file, parsed into `(section, key, value)` entries in file order.
struct Unit {
    name: &'static str,
    entries: Vec<(String, String, String)>,
}

impl Unit {
    /// Reads and parses `systemd/<name>` of this repository.
    fn load(name: &'static str) -> Unit {
        let text = std::fs::read_to_string(units_dir().join(name))
            .unwrap_or_else(|e| panic!("cannot read systemd/{name}: {e}"));
        Unit {
            name,
            entries: parse_unit(&text),
        }
    }

    /// Every value given to `key` in `section`, in order (keys such as
    /// `SystemCallFilter=` may repeat).
    fn all(&self, section: &str, key: &str) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|(s, k, _)| s == section && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    }

    /// The single value of `key` in `section`; panics when it is missing or repeated.
    fn one(&self, section: &str, key: &str) -> &str {
        match self.all(section, key).as_slice() {
            [v] => v,
            [] => panic!("{}: [{section}] {key}= is missing", self.name),
            many => panic!(
                "{}: [{section}] {key}= is set {} times",
                self.name,
                many.len()
            ),
        }
    }
}

/// A minimal unit-file parser: `[Section]` headers, `Key=Value` lines, `#`/`;`
/// comments, blank lines, and lines continued with a trailing backslash.
fn parse_unit(text: &str) -> Vec<(String, String, String)> {
    let mut entries = Vec::new();
    let mut section = String::new();
    let mut pending = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with(';'))
        {
            continue;
        }
        if let Some(cont) = line.strip_suffix('\\') {
            pending.push_str(cont);
            pending.push(' ');
            continue;
        }
        pending.push_str(line);
        let logical = std::mem::take(&mut pending);
        if let Some(name) = logical.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
        } else if let Some((key, value)) = logical.split_once('=') {
            assert!(!section.is_empty(), "entry before any section: {logical}");
            entries.push((
                section.clone(),
                key.trim().to_string(),
                value.trim().to_string(),
            ));
        } else {
            panic!("not a unit-file line: {logical}");
        }
    }
    entries
}

fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd")
}

/// Seconds in a systemd time span such as `45s`, `2min`, `4h` or `60`.
fn seconds(span: &str) -> u64 {
    let digits: String = span.chars().take_while(char::is_ascii_digit).collect();
    let n: u64 = digits
        .parse()
        .unwrap_or_else(|_| panic!("not a time span: {span}"));
    match &span[digits.len()..] {
        "" | "s" | "sec" => n,
        "min" | "m" => n * 60,
        "h" => n * 3600,
        other => panic!("unit {other:?} not handled in time span {span}"),
    }
}

/// The Type=notify daemon: validates its config first, logs JSON, is watched by
/// the watchdog, restarts on failure (but not on config or credential errors), and
/// gives the ~10 s graceful shutdown room before SIGKILL.
#[test]
fn daemon_service_is_notify_validated_and_watched() {
    let u = Unit::load("paysync.service");
    assert_eq!(u.one("Service", "Type"), "notify");
    assert_eq!(u.one("Service", "NotifyAccess"), "main");
    assert_eq!(
        u.one("Service", "ExecStartPre"),
        format!("{INSTALLED_BINARY} validate --config /etc/paysync/config.toml")
    );
    assert_eq!(
        u.one("Service", "ExecStart"),
        format!("{INSTALLED_BINARY} daemon --config /etc/paysync/config.toml --log-format json")
    );
    assert_eq!(u.one("Service", "Restart"), "on-failure");
    assert_eq!(u.one("Service", "RestartPreventExitStatus"), "2 3");
    assert!(seconds(u.one("Service", "RestartSec")) >= 1);
    assert_eq!(u.one("Service", "WatchdogSec"), "60");
    assert!(
        seconds(u.one("Service", "TimeoutStopSec")) > 10,
        "the stop timeout must exceed paysync's 10 s in-flight grace"
    );
    let ok = u.one("Service", "SuccessExitStatus");
    assert!(ok.split(' ').any(|c| c == "143") && ok.split(' ').any(|c| c == "130"));
    assert_eq!(u.one("Install", "WantedBy"), "multi-user.target");
}

/// The timer flavour: a oneshot `paysync run` without a progress bar, logging JSON,
/// started nightly by a persistent timer with a randomized delay.
#[test]
fn export_service_is_a_oneshot_run_started_by_a_nightly_persistent_timer() {
    let s = Unit::load("paysync-export.service");
    assert_eq!(s.one("Service", "Type"), "oneshot");
    assert_eq!(
        s.one("Service", "ExecStartPre"),
        format!("{INSTALLED_BINARY} validate --config /etc/paysync/config.toml")
    );
    assert_eq!(
        s.one("Service", "ExecStart"),
        format!(
            "{INSTALLED_BINARY} run --config /etc/paysync/config.toml --no-progress --log-format json"
        )
    );
    assert!(seconds(s.one("Service", "TimeoutStopSec")) > 10);
    assert!(
        s.all("Unit", "Conflicts").is_empty(),
        "Conflicts= would let the nightly timer stop the daemon"
    );
    assert!(
        s.all("Install", "WantedBy").is_empty(),
        "started by the timer only"
    );

    let t = Unit::load("paysync-export.timer");
    assert!(!t.one("Timer", "OnCalendar").is_empty());
    assert_eq!(t.one("Timer", "Persistent"), "true");
    assert!(seconds(t.one("Timer", "RandomizedDelaySec")) > 0);
    assert_eq!(t.one("Timer", "Unit"), "paysync-export.service");
    assert_eq!(t.one("Install", "WantedBy"), "timers.target");
}

/// Both services run with the same identity, directories, credential and sandbox:
/// a dynamic user with no capabilities, a read-only system, the
/// `@system-service` call set minus privileged and resource calls, and only
/// IPv4/IPv6/Unix sockets.
#[test]
fn both_services_carry_the_same_hardening() {
    for name in SERVICES {
        let u = Unit::load(name);
        for (key, want) in HARDENING {
            assert_eq!(u.one("Service", key), *want, "{name}: {key}=");
        }
        assert_eq!(
            u.all("Service", "SystemCallFilter"),
            ["@system-service", "~@privileged @resources"],
            "{name}: SystemCallFilter="
        );
        let after = u.all("Unit", "After");
        assert!(after.contains(&"network-online.target"), "{name}: After=");
        assert!(
            u.all("Unit", "Wants").contains(&"network-online.target"),
            "{name}: Wants="
        );
    }
}

/// The parser used above understands comments, repeated keys, empty values and
/// continuation lines, so the checks above cannot pass by misreading a file.
#[test]
fn unit_parser_reads_sections_repeats_empties_and_continuations() {
    let entries =
        parse_unit("# comment\n[Unit]\n; other comment\nA=1\n\n[Service]\nB=\nC=x \\\n  y\nC=z\n");
    let flat: Vec<(&str, &str, &str)> = entries
        .iter()
        .map(|(s, k, v)| (s.as_str(), k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        flat,
        [
            ("Unit", "A", "1"),
            ("Service", "B", ""),
            ("Service", "C", "x  y"),
            ("Service", "C", "z"),
        ]
    );
}

/// `systemd-analyze verify` accepts the three units (pointed at the built binary)
/// without an error or a warning about any of them.
#[test]
fn units_pass_systemd_analyze_verify() {
    let Some(_version) = systemd_analyze_version() else {
        return;
    };
    let dir = copies_with_built_binary();
    let mut cmd = analyze();
    cmd.args(["verify", "--man=no"]);
    for name in UNITS {
        cmd.arg(dir.path().join(name));
    }
    let out = run(cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed ({}):\n{stderr}",
        out.status
    );
    // Unknown keys and bad values are only warnings (exit 0), so read stderr too.
    // Lines about other units of the host (if any) are not ours to judge.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| UNITS.iter().any(|u| l.contains(u)))
        .collect();
    assert!(
        ours.is_empty(),
        "systemd-analyze verify warned:\n{}",
        ours.join("\n")
    );
}

/// `systemd-analyze security --offline=yes` rates each service at an overall
/// exposure of 2.0 or lower, both by its own threshold check and by the figure it
/// prints.
#[test]
fn services_have_exposure_at_most_2_0() {
    let Some(version) = systemd_analyze_version() else {
        return;
    };
    if version < MIN_SYSTEMD_FOR_OFFLINE_SECURITY {
        skip(&format!(
            "systemd-analyze {version} has no `security --offline` (needs {MIN_SYSTEMD_FOR_OFFLINE_SECURITY})"
        ));
        return;
    }
    let dir = copies_with_built_binary();
    for name in SERVICES {
        let mut cmd = analyze();
        // The threshold is on the 0..100 scale: 20 means an exposure of 2.0.
        cmd.args(["security", "--offline=yes", "--threshold=20", "--no-pager"])
            .arg(dir.path().join(name));
        let out = run(cmd);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let exposure = overall_exposure(&stdout, name)
            .unwrap_or_else(|| panic!("no overall exposure line for {name}:\n{stdout}\n{stderr}"));
        assert!(
            exposure <= MAX_EXPOSURE,
            "{name}: exposure {exposure} > {MAX_EXPOSURE}; the ✗ lines say why:\n{stdout}"
        );
        assert!(
            out.status.success(),
            "systemd-analyze security --threshold=20 failed for {name} ({}):\n{stdout}\n{stderr}",
            out.status
        );
    }
}

/// Reads `→ Overall exposure level for paysync.service: 1.1 OK 🙂`.
fn overall_exposure(stdout: &str, unit: &str) -> Option<f64> {
    let marker = format!("Overall exposure level for {unit}:");
    let line = stdout.lines().find(|l| l.contains(&marker))?;
    let rest = &line[line.find(&marker)? + marker.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// A temporary directory holding the three units with [`INSTALLED_BINARY`] replaced
/// by the binary cargo built for this test.
fn copies_with_built_binary() -> tempfile::TempDir {
    let built = env!("CARGO_BIN_EXE_paysync");
    // systemd splits ExecStart= on whitespace unless the word is quoted.
    let exe = if built.contains(char::is_whitespace) {
        format!("\"{built}\"")
    } else {
        built.to_string()
    };
    let dir = tempfile::Builder::new()
        .prefix("units-")
        .tempdir()
        .expect("temp dir");
    for name in UNITS {
        let text = std::fs::read_to_string(units_dir().join(name)).expect("read unit");
        if name.ends_with(".service") {
            assert!(
                text.contains(INSTALLED_BINARY),
                "{name} does not run {INSTALLED_BINARY}"
            );
        }
        std::fs::write(dir.path().join(name), text.replace(INSTALLED_BINARY, &exe))
            .expect("write unit copy");
    }
    dir
}

/// `systemd-analyze` with colours, pager and hyperlinks off, so output is plain text.
fn analyze() -> Command {
    let mut cmd = Command::new("systemd-analyze");
    cmd.env("SYSTEMD_COLORS", "0")
        .env("SYSTEMD_PAGER", "cat")
        .env("SYSTEMD_URLIFY", "0")
        .env("LC_ALL", "C.UTF-8");
    cmd
}

fn run(mut cmd: Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// The systemd version behind `systemd-analyze` (e.g. 252), or `None` after printing
/// a skip notice when the tool is not installed.
fn systemd_analyze_version() -> Option<u32> {
    match analyze().arg("--version").output() {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            // First line: "systemd 252 (252.38-1~deb12u1)".
            let version = text
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("unexpected systemd-analyze --version: {text}"));
            Some(version)
        }
        Ok(out) => panic!("systemd-analyze --version failed: {}", out.status),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            skip("systemd-analyze not installed (Debian: apt-get install -y systemd)");
            None
        }
        Err(e) => panic!("cannot run systemd-analyze: {e}"),
    }
}

/// Writes straight to stderr, past the test harness's output capture, so the skip is
/// visible in CI logs.
fn skip(why: &str) {
    let _ = writeln!(std::io::stderr(), "skipped: {why}");
}
