//! The config file: raw TOML structs (`raw`, unknown keys refused) validated once
//! into [`Settings`], the one object the rest of paysync reads. Every error names
//! the file and the key.
//!
//! - [`Settings`] and its sections: validated values with defaults applied.
//! - [`SecretSource`]: where a secret comes from (env var or file); resolved only
//!   when a provider is built, so `status` works without secrets.
//! - [`ConfigError`]: what is wrong, where.

mod raw;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::FixedOffset;
use secrecy::{ExposeSecret, SecretString};

use crate::fetch::retry::{DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_MAX, DEFAULT_MAX_ATTEMPTS};
use crate::fetch::{ClientOptions, RetryPolicy};
use crate::model::PayStatus;
use crate::output::layout::PathTemplate;
use crate::output::{Compression, Encoding, Format};
use crate::provider::ProviderKind;
use crate::provider::genauth::{Brand, GenAuthSettings, default_status_map};
use crate::provider::payprotocol::{DEFAULT_TIME_ZONE, PayProtocolSettings};

/// Default `fetch.concurrency`.
pub const DEFAULT_CONCURRENCY: usize = 16;
/// Default `fetch.rate_limit` (requests per second, every call counted).
pub const DEFAULT_RATE_LIMIT: f64 = 5.0;
/// Default `fetch.burst`.
pub const DEFAULT_BURST: u32 = 1;
/// Default `fetch.timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `fetch.max_body` in bytes: larger answers are errors, not memory growth.
pub const DEFAULT_MAX_BODY: usize = 1 << 20;
/// Default `settle.poll_interval`.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(60);
/// Default `settle.backoff_factor`: each re-poll waits this much longer.
pub const DEFAULT_POLL_BACKOFF: f64 = 1.5;
/// Default `settle.max_poll_interval`.
pub const DEFAULT_MAX_POLL_INTERVAL: Duration = Duration::from_secs(3600);
/// Default `settle.confirming_interval` (block confirmation is usually quick).
pub const DEFAULT_CONFIRMING_INTERVAL: Duration = Duration::from_secs(15);
/// Default `settle.max_wait`.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(72 * 3600);
/// Default `settle.wait`.
pub const DEFAULT_RUN_WAIT: Duration = Duration::from_secs(600);
/// Default unsettled statuses (`settle.unsettled`).
pub const DEFAULT_UNSETTLED: [PayStatus; 3] = [
    PayStatus::Pending,
    PayStatus::Confirming,
    PayStatus::PartiallyPaid,
];
/// Default `input.column`.
pub const DEFAULT_COLUMN: &str = "order_no";
/// Default `output.dir`.
pub const DEFAULT_OUTPUT_DIR: &str = "out";
/// Default `state.path`.
pub const DEFAULT_STATE_PATH: &str = "paysync.db";

/// What is wrong with a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: key `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// Where a secret is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// An environment variable.
    Env(String),
    /// A file (relative names are looked up in `$CREDENTIALS_DIRECTORY` first).
    File(PathBuf),
    /// A value given directly (demo and tests only; never from a config file).
    Value(String),
}

impl SecretSource {
    /// Reads the secret; `key` is the config key, for the error message.
    pub fn resolve(&self, config: &Path, key: &str) -> Result<SecretString, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: config.to_owned(),
            key: key.to_owned(),
            message,
        };
        let value = match self {
            SecretSource::Value(v) => v.clone(),
            SecretSource::Env(var) => std::env::var(var).map_err(|_| {
                invalid(format!(
                    "environment variable {var} is not set (or not UTF-8)"
                ))
            })?,
            SecretSource::File(p) => {
                let path = credential_path(p);
                std::fs::read_to_string(&path)
                    .map_err(|e| {
                        invalid(format!("cannot read secret file {}: {e}", path.display()))
                    })?
                    .trim_end_matches(['\r', '\n'])
                    .to_owned()
            }
        };
        if value.trim().is_empty() {
            return Err(invalid("the secret is empty".into()));
        }
        Ok(SecretString::from(value))
    }
}

/// A relative secret file name is looked up in systemd's `$CREDENTIALS_DIRECTORY`
/// (`LoadCredential=`) when that is set and holds it.
fn credential_path(p: &Path) -> PathBuf {
    if p.is_relative()
        && let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY")
    {
        let candidate = Path::new(&dir).join(p);
        if candidate.exists() {
            return candidate;
        }
    }
    p.to_owned()
}

/// Provider section, validated; secrets still unresolved.
#[derive(Debug, Clone)]
pub enum ProviderConfig {
    PayProtocol {
        base_url: String,
        api_key: String,
        api_secret: SecretSource,
        naive_zone: FixedOffset,
        decimals: HashMap<(i64, String), u32>,
    },
    GenAuth {
        base_url: String,
        access_key_id: String,
        access_key_secret: SecretSource,
        brand: Brand,
        lang: Option<String>,
        status_map: BTreeMap<String, PayStatus>,
        naive_zone: FixedOffset,
    },
}

impl ProviderConfig {
    pub fn kind(&self) -> ProviderKind {
        match self {
            ProviderConfig::PayProtocol { .. } => ProviderKind::PayProtocol,
            ProviderConfig::GenAuth { .. } => ProviderKind::GenAuth,
        }
    }
}

/// Resolved provider settings, secrets included.
pub enum ProviderSettings {
    PayProtocol(PayProtocolSettings),
    GenAuth(GenAuthSettings),
}

#[derive(Debug, Clone)]
pub struct FetchSettings {
    pub concurrency: usize,
    pub rate_limit: f64,
    pub burst: u32,
    pub timeout: Duration,
    pub retry: RetryPolicy,
    pub max_body: usize,
    /// Trust and protocol of the HTTP client (`fetch.ca_file`,
    /// `fetch.http2_prior_knowledge`).
    pub client: ClientOptions,
}

#[derive(Debug, Clone)]
pub struct SettleSettings {
    pub poll_interval: Duration,
    pub backoff_factor: f64,
    pub max_poll_interval: Duration,
    pub confirming_interval: Duration,
    pub max_wait: Duration,
    pub wait: Duration,
    pub unsettled: BTreeSet<PayStatus>,
}

#[derive(Debug, Clone)]
pub struct InputSettings {
    pub column: String,
    pub payment_no_column: Option<String>,
    /// Default inputs of `paysync run` when no `--input` is given.
    pub files: Vec<PathBuf>,
    pub queue_files: Vec<PathBuf>,
    /// Where rotated queue files may also be, as logrotate's `olddir`: relative to
    /// each queue file's directory unless absolute.
    pub rotated_dir: Option<PathBuf>,
    pub inbox_dir: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct OutputSettings {
    pub dir: PathBuf,
    pub format: Format,
    /// `None`: the format's default (zstd inside Parquet, none for text).
    pub compression: Option<Compression>,
    pub path_template: PathTemplate,
}

impl OutputSettings {
    /// The format with its compression; `Err` says why the pair is impossible
    /// (snappy for text, a format this build lacks).
    pub fn encoding(&self) -> Result<Encoding, String> {
        Encoding::with(
            self.format,
            self.compression
                .unwrap_or_else(|| self.format.default_compression()),
        )
    }
}

#[derive(Debug, Clone, Default)]
pub struct ScheduleSettings {
    pub ingest: Option<String>,
    pub export: Option<String>,
}

#[derive(Debug, Clone)]
pub struct StateSettings {
    pub path: PathBuf,
}

/// Daemon mode's Prometheus endpoint (off unless `metrics.listen` is set).
#[derive(Debug, Clone, Default)]
pub struct MetricsSettings {
    pub listen: Option<std::net::SocketAddr>,
    /// Where the bearer token scrapers must send comes from, if one is required.
    pub token: Option<SecretSource>,
    /// The certificate and key to serve https with, if set.
    pub tls: Option<MetricsTls>,
}

/// `metrics.tls_cert_file` and `metrics.tls_key_file`.
#[derive(Debug, Clone)]
pub struct MetricsTls {
    /// PEM certificate chain, the server's own certificate first.
    pub cert: PathBuf,
    /// PEM private key, read like a secret file (`$CREDENTIALS_DIRECTORY` for a
    /// bare name).
    pub key: SecretSource,
}

impl MetricsSettings {
    /// Reads the bearer token (`config` is the config file, for messages).
    pub fn bearer_token(&self, config: &Path) -> Result<Option<SecretString>, ConfigError> {
        let Some(source) = &self.token else {
            return Ok(None);
        };
        let key = match source {
            SecretSource::Env(_) => "metrics.bearer_token_env",
            _ => "metrics.bearer_token_file",
        };
        source.resolve(config, key).map(Some)
    }

    /// Reads the certificate chain and key and sets up TLS for the endpoint, if
    /// configured (`config` is the config file, for messages).
    pub fn tls_config(
        &self,
        config: &Path,
    ) -> Result<Option<Arc<rustls::ServerConfig>>, ConfigError> {
        use crate::tls_server::PemError;
        let Some(tls) = &self.tls else {
            return Ok(None);
        };
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: config.to_owned(),
            key: key.to_owned(),
            message,
        };
        let (cert_key, key_key) = ("metrics.tls_cert_file", "metrics.tls_key_file");
        let shown = tls.cert.display();
        let pem = std::fs::read(&tls.cert)
            .map_err(|e| invalid(cert_key, format!("cannot read {shown}: {e}")))?;
        let secret = tls.key.resolve(config, key_key)?;
        crate::tls_server::from_pem(&pem, secret.expose_secret().as_bytes())
            .map(|c| Some(Arc::new(c)))
            .map_err(|e| match e {
                PemError::Certificate(_) | PemError::NoCertificate => {
                    invalid(cert_key, format!("{shown} {e}"))
                }
                PemError::Key(_) => invalid(key_key, e.to_string()),
                PemError::Mismatch(m) => invalid(
                    key_key,
                    format!("cannot be used with the certificate in {shown}: {m}"),
                ),
            })
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The file it came from (for error messages); `<built-in>` for the demo.
    pub source: PathBuf,
    pub provider: ProviderConfig,
    pub fetch: FetchSettings,
    pub settle: SettleSettings,
    pub input: InputSettings,
    pub output: OutputSettings,
    pub schedule: ScheduleSettings,
    pub state: StateSettings,
    pub metrics: MetricsSettings,
}

impl Settings {
    /// Reads and validates a config file. Relative paths in it are resolved against
    /// the file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path
            .parent()
            .map(Path::to_owned)
            .unwrap_or_else(|| PathBuf::from("."));
        Self::from_toml(&text, path, &base)
    }

    /// Validates config text; `source` names it in errors, `base` anchors relative paths.
    pub fn from_toml(text: &str, source: &Path, base: &Path) -> Result<Self, ConfigError> {
        let raw: raw::Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: source.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        raw.validate(source, base)
    }

    /// Resolves secrets and builds the provider settings.
    pub fn provider_settings(&self) -> Result<ProviderSettings, ConfigError> {
        let src = &self.source;
        Ok(match &self.provider {
            ProviderConfig::PayProtocol {
                base_url,
                api_key,
                api_secret,
                naive_zone,
                decimals,
            } => ProviderSettings::PayProtocol(PayProtocolSettings {
                base_url: base_url.clone(),
                api_key: api_key.clone(),
                api_secret: api_secret.resolve(src, secret_key(api_secret, "api_secret"))?,
                naive_zone: *naive_zone,
                decimals: decimals.clone(),
            }),
            ProviderConfig::GenAuth {
                base_url,
                access_key_id,
                access_key_secret,
                brand,
                lang,
                status_map,
                naive_zone,
            } => ProviderSettings::GenAuth(GenAuthSettings {
                base_url: base_url.clone(),
                access_key_id: access_key_id.clone(),
                access_key_secret: access_key_secret
                    .resolve(src, secret_key(access_key_secret, "access_key_secret"))?,
                brand: *brand,
                lang: lang.clone(),
                status_map: status_map.clone(),
                naive_zone: *naive_zone,
            }),
        })
    }
}

/// The config key a secret came from, for messages.
fn secret_key(s: &SecretSource, stem: &'static str) -> &'static str {
    match (s, stem) {
        (SecretSource::Env(_), "api_secret") => "provider.api_secret_env",
        (SecretSource::File(_), "api_secret") => "provider.api_secret_file",
        (SecretSource::Env(_), _) => "provider.access_key_secret_env",
        (SecretSource::File(_), _) => "provider.access_key_secret_file",
        (SecretSource::Value(_), _) => "provider",
    }
}

/// Parses `"+08:00"`, `"-05:30"`, `"UTC"` or `"Z"` into a fixed offset.
pub fn parse_zone(s: &str) -> Option<FixedOffset> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("utc") || s == "Z" {
        return FixedOffset::east_opt(0);
    }
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1, &s[1..]),
        b'-' => (-1, &s[1..]),
        _ => return None,
    };
    let (h, m) = rest.split_once(':').unwrap_or((rest, "0"));
    let (h, m): (i32, i32) = (h.parse().ok()?, m.parse().ok()?);
    if !(0..=14).contains(&h) || !(0..60).contains(&m) {
        return None;
    }
    FixedOffset::east_opt(sign * (h * 3600 + m * 60))
}

/// The default zone of naive provider times.
pub fn default_zone() -> FixedOffset {
    parse_zone(DEFAULT_TIME_ZONE).expect("default zone parses")
}

/// The GenAuth payStatus defaults, re-exported for docs and the example config.
pub fn genauth_default_status_map() -> BTreeMap<String, PayStatus> {
    default_status_map()
}

#[cfg(test)]
mod tests;
