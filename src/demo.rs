//! `paysync demo`: the bundled mock server on a free loopback port, a sample CSV of
//! a few hundred orders (with extra columns, a few bad rows and a duplicate), a
//! config file pointing at the mock, and a real run through the real HTTP client.
//! Needs no credentials and no network beyond loopback.

use std::fmt::Write as _;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::config::Settings;
use crate::mock::{MockOptions, MockServer};
use crate::pipeline::{self, RunError, RunOptions, RunReport};
use crate::provider::ProviderKind;

/// How long the demo run keeps polling orders that are not settled yet.
pub const DEMO_WAIT: Duration = Duration::from_secs(8);

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot write demo file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the mock server")]
    Mock(#[source] std::io::Error),
    #[error(transparent)]
    Run(#[from] RunError),
}

/// What the demo produced.
pub struct DemoOutcome {
    pub mock_url: String,
    pub config: PathBuf,
    pub input: PathBuf,
    pub report: RunReport,
}

fn write(path: &Path, text: &str) -> Result<(), DemoError> {
    std::fs::write(path, text).map_err(|source| DemoError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Scenario markers the mock server understands, in the demo's proportions.
const MIX: [&str; 20] = [
    "", "", "", "", "", "", "", "", "", "", "PAID", "PAID", "PENDING", "PENDING", "CONFIRM",
    "FAILED", "REFUND", "NOTFOUND", "BIG", "PENDING",
];

/// The sample input: `orders` rows plus a few rows that show the rejects file.
pub fn sample_csv(orders: usize, prefix: &str) -> String {
    let customers = [
        "Acme Ltd",
        "Globex",
        "Initech",
        "=HYPERLINK(\"x\")",
        "Umbrella, Inc.",
    ];
    let mut s = String::from("order_no,payment_no,customer,note\n");
    for i in 0..orders {
        let marker = MIX[i % MIX.len()];
        let no = if marker.is_empty() {
            format!("{prefix}-{i:05}")
        } else {
            format!("{prefix}-{marker}-{i:05}")
        };
        let customer = customers[i % customers.len()].replace('"', "\"\"");
        let note = if i % 7 == 0 {
            "\"multi\nline note\""
        } else {
            ""
        };
        let _ = writeln!(s, "{no},,\"{customer}\",{note}");
    }
    // Rows that go to the rejects file, and a duplicate that is fetched once.
    s.push_str(",,Missing order number,\n");
    s.push_str(&format!("{prefix} BAD,,Space inside,\n"));
    s.push_str(&format!("{prefix}-00001,,Duplicate of row 2,\n"));
    s
}

fn config_text(kind: ProviderKind, base_url: &str, dir: &Path) -> String {
    let provider = match kind {
        ProviderKind::PayProtocol => format!(
            "kind = \"payprotocol\"\nbase_url = \"{base_url}\"\napi_key = \"{}\"\napi_secret_file = \"secret\"\n",
            MockOptions::default().payprotocol_api_key
        ),
        ProviderKind::GenAuth => format!(
            "kind = \"genauth\"\nbase_url = \"{base_url}\"\naccess_key_id = \"{}\"\naccess_key_secret_file = \"secret\"\n",
            MockOptions::default().genauth_access_key_id
        ),
    };
    let _ = dir;
    format!(
        "# Written by `paysync demo`: points at the demo's mock server.\n\
         [provider]\n{provider}\n\
         [fetch]\nconcurrency = 16\nrate_limit = 200.0\nburst = 20\ntimeout = \"5s\"\nbackoff_base = \"100ms\"\n\n\
         [settle]\npoll_interval = \"1s\"\nconfirming_interval = \"1s\"\nbackoff_factor = 1.0\nwait = \"{}s\"\n\n\
         [input]\ncolumn = \"order_no\"\npayment_no_column = \"payment_no\"\n\n\
         [output]\ndir = \"out\"\nformat = \"jsonl\"\n\n\
         [state]\npath = \"paysync.db\"\n",
        DEMO_WAIT.as_secs()
    )
}

/// Runs the demo in `dir` (created if needed). Order numbers get a fresh prefix each
/// time, so repeated demos in one directory each fetch their own orders.
pub async fn run_demo(
    kind: ProviderKind,
    orders: usize,
    dir: &Path,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<DemoOutcome, DemoError> {
    std::fs::create_dir_all(dir).map_err(|source| DemoError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let opts = MockOptions::default();
    let secret = match kind {
        ProviderKind::PayProtocol => opts.payprotocol_api_secret.clone(),
        ProviderKind::GenAuth => opts.genauth_access_key_secret.clone(),
    };
    let mock = MockServer::start("127.0.0.1:0".parse().expect("valid address"), opts)
        .await
        .map_err(DemoError::Mock)?;
    let base_url = match kind {
        ProviderKind::PayProtocol => mock.payprotocol_base_url(),
        ProviderKind::GenAuth => mock.genauth_base_url(),
    };
    write(&dir.join("secret"), &format!("{secret}\n"))?;
    let config = dir.join("config.toml");
    write(&config, &config_text(kind, &base_url, dir))?;
    let prefix = format!("DEMO{:04X}", rand::random::<u16>());
    let input = dir.join(format!("orders-{prefix}.csv"));
    write(&input, &sample_csv(orders, &prefix))?;
    let settings = Arc::new(Settings::load(&config).map_err(RunError::from)?);
    let report = pipeline::run(
        settings,
        RunOptions {
            inputs: vec![input.clone()],
            wait: DEMO_WAIT,
            progress: true,
        },
        shutdown,
    )
    .await;
    mock.shutdown().await;
    Ok(DemoOutcome {
        mock_url: base_url,
        config,
        input,
        report: report?,
    })
}
