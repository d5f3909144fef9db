//! Test helpers: a temporary workspace with a config file, the real `paysync`
//! binary, the in-process mock server, and readers for committed output.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use paysync::mock::{MockOptions, MockServer};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Starts the mock server on 127.0.0.1 with a free port.
pub async fn mock(opts: MockOptions) -> MockServer {
    MockServer::start("127.0.0.1:0".parse().unwrap(), opts)
        .await
        .expect("mock server starts")
}

/// The proxy variables paysync reads (upper and lower case).
pub const PROXY_VARS: [&str; 8] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
];

/// `paysync run` on the workspace's config and `orders.csv`, as a full argument
/// list (for tests that loop over several commands).
pub const RUN_ORDERS_CSV: &[&str] = &[
    "run",
    "--config",
    "config.toml",
    "--no-progress",
    "--input",
    "orders.csv",
];

/// A temporary directory holding config, secret, inputs, state and output.
pub struct Workspace {
    dir: tempfile::TempDir,
}

/// The test config's defaults: fast schedules, no waiting, a high rate limit.
const DEFAULTS: &str = r#"
[fetch]
concurrency = 8
rate_limit = 1000.0
burst = 50
timeout = "5s"
max_attempts = 6
backoff_base = "20ms"
backoff_max = "200ms"

[settle]
poll_interval = "100ms"
confirming_interval = "100ms"
backoff_factor = 1.0
max_wait = "1h"
wait = "0s"

[output]
dir = "out"
format = "jsonl"

[state]
path = "state.db"
"#;

impl Workspace {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.path(rel);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Writes `config.toml` for PayProtocol at `base_url`, with `overrides` (TOML)
    /// merged over the test defaults, and the secret in a file.
    pub fn config(&self, base_url: &str, secret: &str, overrides: &str) -> PathBuf {
        let provider = format!(
            "[provider]\nkind = \"payprotocol\"\nbase_url = \"{base_url}\"\napi_key = \"{}\"\napi_secret_file = \"secret\"\n",
            paysync::mock::DEFAULT_API_KEY
        );
        self.write_config(&provider, secret, overrides)
    }

    /// The same for GenAuth.
    pub fn genauth_config(&self, base_url: &str, secret: &str, overrides: &str) -> PathBuf {
        let provider = format!(
            "[provider]\nkind = \"genauth\"\nbase_url = \"{base_url}\"\naccess_key_id = \"{}\"\naccess_key_secret_file = \"secret\"\n",
            paysync::mock::DEFAULT_ACCESS_KEY_ID
        );
        self.write_config(&provider, secret, overrides)
    }

    fn write_config(&self, provider: &str, secret: &str, overrides: &str) -> PathBuf {
        let mut table: toml::Table = toml::from_str(&format!("{provider}{DEFAULTS}")).unwrap();
        let extra: toml::Table = toml::from_str(overrides).expect("override TOML parses");
        merge(&mut table, extra);
        self.write("secret", &format!("{secret}\n"));
        self.write("config.toml", &toml::to_string(&table).unwrap())
    }

    /// Runs the real binary in the workspace and waits for it.
    pub async fn paysync(&self, args: &[&str]) -> Output {
        self.command(args).output().await.expect("paysync runs")
    }

    /// The real binary, run in the workspace. Proxy variables of the machine running
    /// the tests are removed (a test about proxies sets its own after this).
    pub fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_paysync"));
        cmd.args(args)
            .current_dir(self.dir.path())
            .env("RUST_LOG", "info")
            .env_remove("CREDENTIALS_DIRECTORY")
            .kill_on_drop(true);
        for var in PROXY_VARS {
            cmd.env_remove(var);
        }
        cmd
    }

    /// `paysync run --config config.toml --no-progress` plus `args`, not started
    /// (for tests that set a failpoint, signal it, or run two at once).
    pub fn run_command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = self.command(&["run", "--config", "config.toml", "--no-progress"]);
        cmd.args(args);
        cmd
    }

    /// `paysync run --config config.toml --no-progress` plus `args`, to the end.
    pub async fn run(&self, args: &[&str]) -> Output {
        self.run_command(args).output().await.expect("paysync runs")
    }

    /// Every row of every committed (manifested) data file, checked against its
    /// manifest's row count and sha256.
    pub fn rows(&self) -> Vec<Value> {
        committed_rows(&self.path("out"))
    }

    /// Files in the output directory, by name.
    pub fn out_files(&self) -> BTreeSet<String> {
        match std::fs::read_dir(self.path("out")) {
            Ok(rd) => rd
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => BTreeSet::new(),
        }
    }
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// Reads all manifested JSONL files in `dir`, verifying each against its manifest.
pub fn committed_rows(dir: &Path) -> Vec<Value> {
    let mut rows = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return rows;
    };
    let mut manifests: Vec<PathBuf> = rd
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".manifest.json"))
        .collect();
    manifests.sort();
    for m in manifests {
        let manifest: Value = serde_json::from_slice(&std::fs::read(&m).unwrap()).unwrap();
        let data = dir.join(manifest["data_file"].as_str().unwrap());
        let bytes = std::fs::read(&data).unwrap();
        assert_eq!(
            hex::encode(Sha256::digest(&bytes)),
            manifest["sha256"].as_str().unwrap(),
            "sha256 of {}",
            data.display()
        );
        let text = String::from_utf8(bytes).unwrap();
        let file_rows: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(file_rows.len() as u64, manifest["rows"].as_u64().unwrap());
        rows.extend(file_rows);
    }
    rows
}

/// The latest row per order number (by `observed_at`, then file order).
pub fn latest(rows: &[Value]) -> std::collections::BTreeMap<String, Value> {
    let mut m = std::collections::BTreeMap::new();
    for r in rows {
        let k = r["order_no"].as_str().unwrap().to_owned();
        let newer = m.get(&k).is_none_or(|old: &Value| {
            old["observed_at"].as_str().unwrap() <= r["observed_at"].as_str().unwrap()
        });
        if newer {
            m.insert(k, r.clone());
        }
    }
    m
}

/// Asserts that no (order, status, tracking) appears twice.
pub fn assert_no_duplicates(rows: &[Value]) {
    let mut seen = BTreeSet::new();
    for r in rows {
        let key = (
            r["provider"].as_str().unwrap().to_owned(),
            r["order_no"].as_str().unwrap().to_owned(),
            r["status"].as_str().unwrap().to_owned(),
            r["tracking"].as_str().unwrap().to_owned(),
        );
        assert!(seen.insert(key.clone()), "duplicate row {key:?}");
    }
}

/// A CSV of order numbers with an extra column.
pub fn orders_csv(orders: &[String]) -> String {
    let mut s = String::from("order_no,customer\n");
    for (i, o) in orders.iter().enumerate() {
        s.push_str(&format!("{o},customer-{i}\n"));
    }
    s
}

/// `n` order numbers containing `marker`.
pub fn numbered(marker: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("T-{marker}-{i:04}")).collect()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Waits (up to 30 s) until `cond` holds, checking every 10 ms.
pub async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends a real SIGTERM to a running child process.
pub fn sigterm(child: &tokio::process::Child) {
    let pid = child.id().expect("running").to_string();
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// Stops a child with a real SIGTERM, checks that it exits 0 (within a minute),
/// and returns its stderr (the child must have been spawned with it piped).
pub async fn stop_by_sigterm(mut child: tokio::process::Child) -> String {
    use tokio::io::AsyncReadExt;
    sigterm(&child);
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr piped")
        .read_to_string(&mut err)
        .await
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("the child stops after SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0), "{err}");
    err
}
