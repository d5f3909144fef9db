//! The `paysync mock-server` flags ([`MockArgs`]), turned into [`MockOptions`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{
    DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET, DEFAULT_API_KEY, DEFAULT_API_SECRET,
    DEFAULT_CONFIRM_POLLS, DEFAULT_EXPIRES_IN, DEFAULT_LISTEN, DEFAULT_MAX_CONSECUTIVE_FAULTS,
    DEFAULT_PENDING_POLLS, DEFAULT_USERPOOL_ID, FaultKind, MockOptions, RetryAfterMode,
};

/// Flags of `paysync mock-server`: the listener (`--listen`, `--tls-*`), and one
/// for every [`MockOptions`] field.
#[derive(Debug, Clone, clap::Args)]
pub struct MockArgs {
    /// Address to listen on (port 0: any free port; the line printed at start says which).
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Serve https with this PEM certificate chain (its own certificate first),
    /// offering HTTP/2 and http/1.1 through ALPN. Needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PayProtocol API key the server accepts.
    #[arg(long, default_value = DEFAULT_API_KEY)]
    pub api_key: String,
    /// PayProtocol API secret signatures are checked with.
    #[arg(long, default_value = DEFAULT_API_SECRET)]
    pub api_secret: String,
    /// GenAuth access key id the server accepts.
    #[arg(long, default_value = DEFAULT_ACCESS_KEY_ID)]
    pub access_key_id: String,
    /// GenAuth access key secret the server accepts.
    #[arg(long, default_value = DEFAULT_ACCESS_KEY_SECRET)]
    pub access_key_secret: String,
    /// GenAuth token lifetime in seconds.
    #[arg(long, default_value_t = DEFAULT_EXPIRES_IN)]
    pub expires_in: u64,
    /// GenAuth user pool id (token claim and required header).
    #[arg(long, default_value = DEFAULT_USERPOOL_ID)]
    pub userpool_id: String,

    /// Server-side rate limit in requests per second over all endpoints.
    #[arg(long)]
    pub rate_limit: Option<f64>,
    /// How throttled PayProtocol answers say when to retry.
    #[arg(long, value_enum, default_value_t = RetryAfterMode::Seconds)]
    pub retry_after: RetryAfterMode,

    /// Share (0..1) of orders whose first attempts fail.
    #[arg(long, default_value_t = 0.0)]
    pub fault_share: f64,
    /// Fault kinds, comma-separated: 500,502,503,html,malformed,reset,slow,large,
    /// large-chunked,429.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "500,503,html,malformed,reset,429"
    )]
    pub fault_kinds: Vec<FaultKind>,
    /// Attempts in a row a faulted order fails before it succeeds.
    #[arg(long, default_value_t = DEFAULT_MAX_CONSECUTIVE_FAULTS)]
    pub max_consecutive_faults: u32,
    /// Share (0..1) of all requests faulted at random.
    #[arg(long, default_value_t = 0.0)]
    pub random_fault_rate: f64,
    /// Seed of the fault choices.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Latency added to every answer, e.g. `50ms`.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    pub latency: Duration,
    /// How long the `slow` fault waits, e.g. `30s`.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    pub slow_delay: Duration,

    /// Answered polls a PENDING order stays pending.
    #[arg(long, default_value_t = DEFAULT_PENDING_POLLS)]
    pub pending_polls: u32,
    /// Answered polls an order stays in block confirmation.
    #[arg(long, default_value_t = DEFAULT_CONFIRM_POLLS)]
    pub confirm_polls: u32,
    /// Accept PayProtocol timestamps however far from the server clock.
    #[arg(long)]
    pub no_clock_skew_check: bool,
}

impl MockArgs {
    /// The https setup of `--tls-cert` and `--tls-key`, or `None` for plain http.
    /// Errors name the flag and its file.
    pub fn tls(&self) -> Result<Option<Arc<rustls::ServerConfig>>, String> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let read = |flag: &str, path: &PathBuf| {
            std::fs::read(path)
                .map_err(|e| format!("{flag} {}: cannot read it: {e}", path.display()))
        };
        let (cert_pem, key_pem) = (read("--tls-cert", cert)?, read("--tls-key", key)?);
        crate::tls_server::from_pem(&cert_pem, &key_pem)
            .map(|c| Some(Arc::new(c)))
            .map_err(|e| {
                use crate::tls_server::PemError;
                match e {
                    PemError::Certificate(_) | PemError::NoCertificate => {
                        format!("--tls-cert {}: {e}", cert.display())
                    }
                    PemError::Key(_) | PemError::Mismatch(_) => {
                        format!("--tls-key {}: {e}", key.display())
                    }
                }
            })
    }

    /// The options these flags describe.
    pub fn options(&self) -> MockOptions {
        MockOptions {
            payprotocol_api_key: self.api_key.clone(),
            payprotocol_api_secret: self.api_secret.clone(),
            genauth_access_key_id: self.access_key_id.clone(),
            genauth_access_key_secret: self.access_key_secret.clone(),
            genauth_expires_in: self.expires_in,
            genauth_userpool_id: self.userpool_id.clone(),
            rate_limit: self.rate_limit,
            retry_after: self.retry_after,
            fault_share: self.fault_share,
            fault_kinds: self.fault_kinds.clone(),
            max_consecutive_faults: self.max_consecutive_faults,
            random_fault_rate: self.random_fault_rate,
            seed: self.seed,
            latency: self.latency,
            slow_delay: self.slow_delay,
            pending_polls: self.pending_polls,
            confirm_polls: self.confirm_polls,
            clock_skew_rejects: !self.no_clock_skew_check,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        mock: MockArgs,
    }

    /// With no flags the options equal `MockOptions::default()` (and the listen default).
    #[test]
    fn defaults_match_options_default() {
        let cli = Cli::try_parse_from(["mock"]).expect("no flags parse");
        let o = cli.mock.options();
        let d = MockOptions::default();
        assert_eq!(cli.mock.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(format!("{o:?}"), format!("{d:?}"));
    }

    /// Every flag reaches its option.
    #[test]
    fn flags_reach_options() {
        let cli = Cli::try_parse_from([
            "mock",
            "--listen",
            "127.0.0.1:0",
            "--rate-limit",
            "5",
            "--retry-after",
            "http-date",
            "--fault-share",
            "0.2",
            "--fault-kinds",
            "500,502,503,html,malformed,reset,slow,large,large-chunked,429",
            "--random-fault-rate",
            "0.01",
            "--latency",
            "50ms",
            "--slow-delay",
            "2s",
            "--expires-in",
            "60",
            "--pending-polls",
            "3",
            "--confirm-polls",
            "0",
            "--seed",
            "7",
            "--max-consecutive-faults",
            "1",
            "--api-key",
            "k",
            "--api-secret",
            "s",
            "--access-key-id",
            "i",
            "--access-key-secret",
            "x",
            "--no-clock-skew-check",
        ])
        .expect("flags parse");
        let o = cli.mock.options();
        assert_eq!(o.rate_limit, Some(5.0));
        assert_eq!(o.retry_after, RetryAfterMode::HttpDate);
        assert_eq!(o.fault_kinds, FaultKind::ALL.to_vec());
        assert_eq!(o.latency, Duration::from_millis(50));
        assert_eq!(o.slow_delay, Duration::from_secs(2));
        assert_eq!(
            (o.genauth_expires_in, o.pending_polls, o.confirm_polls),
            (60, 3, 0)
        );
        assert_eq!((o.seed, o.max_consecutive_faults), (7, 1));
        assert_eq!(o.payprotocol_api_key, "k");
        assert_eq!(o.payprotocol_api_secret, "s");
        assert_eq!(o.genauth_access_key_id, "i");
        assert_eq!(o.genauth_access_key_secret, "x");
        assert!(!o.clock_skew_rejects);
        assert!((o.fault_share - 0.2).abs() < 1e-9 && (o.random_fault_rate - 0.01).abs() < 1e-9);
        assert!(Cli::try_parse_from(["mock", "--fault-kinds", "teapot"]).is_err());
    }
}
