//! The config file as written: serde structs that refuse unknown keys, and their
//! validation into [`super::Settings`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::fetch::ExtraRoots;

use super::*;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Config {
    provider: Provider,
    #[serde(default)]
    fetch: Fetch,
    #[serde(default)]
    settle: Settle,
    #[serde(default)]
    input: Input,
    #[serde(default)]
    output: Output,
    #[serde(default)]
    schedule: Schedule,
    #[serde(default)]
    state: State,
    #[serde(default)]
    metrics: Metrics,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Metrics {
    listen: Option<String>,
    bearer_token_env: Option<String>,
    bearer_token_file: Option<PathBuf>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Provider {
    kind: String,
    base_url: String,
    api_key: Option<String>,
    api_secret_env: Option<String>,
    api_secret_file: Option<PathBuf>,
    access_key_id: Option<String>,
    access_key_secret_env: Option<String>,
    access_key_secret_file: Option<PathBuf>,
    brand: Option<String>,
    lang: Option<String>,
    time_zone: Option<String>,
    /// PayProtocol: `"<chainId>:<SYMBOL>" = decimals`.
    #[serde(default)]
    decimals: BTreeMap<String, u32>,
    /// GenAuth: `"<payStatus>" = "<status>"`, merged over the defaults.
    #[serde(default)]
    status_map: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Fetch {
    concurrency: Option<i64>,
    rate_limit: Option<f64>,
    burst: Option<i64>,
    timeout: Option<String>,
    max_attempts: Option<i64>,
    backoff_base: Option<String>,
    backoff_max: Option<String>,
    max_body: Option<i64>,
    ca_file: Option<PathBuf>,
    http2_prior_knowledge: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settle {
    poll_interval: Option<String>,
    backoff_factor: Option<f64>,
    max_poll_interval: Option<String>,
    confirming_interval: Option<String>,
    max_wait: Option<String>,
    wait: Option<String>,
    unsettled: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    column: Option<String>,
    payment_no_column: Option<String>,
    #[serde(default)]
    files: Vec<PathBuf>,
    #[serde(default)]
    queue_files: Vec<PathBuf>,
    rotated_dir: Option<PathBuf>,
    inbox_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Output {
    dir: Option<PathBuf>,
    format: Option<String>,
    compression: Option<String>,
    path_template: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Schedule {
    ingest: Option<String>,
    export: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    path: Option<PathBuf>,
}

/// Collects validation errors with the file they came from.
struct Check<'a> {
    source: &'a Path,
}

impl Check<'_> {
    fn err(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.source.to_owned(),
            key: key.to_owned(),
            message: message.into(),
        }
    }

    fn duration(
        &self,
        key: &str,
        v: Option<&str>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match v {
            None => Ok(default),
            Some(s) => humantime::parse_duration(s.trim()).map_err(|e| {
                self.err(
                    key,
                    format!("{s:?} is not a duration like \"30s\" or \"72h\" ({e})"),
                )
            }),
        }
    }

    fn positive_duration(
        &self,
        key: &str,
        v: Option<&str>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let d = self.duration(key, v, default)?;
        if d.is_zero() {
            return Err(self.err(key, "must be greater than zero"));
        }
        Ok(d)
    }

    fn positive_int(
        &self,
        key: &str,
        v: Option<i64>,
        default: i64,
        max: i64,
    ) -> Result<i64, ConfigError> {
        let n = v.unwrap_or(default);
        if n < 1 || n > max {
            return Err(self.err(key, format!("must be between 1 and {max}, got {n}")));
        }
        Ok(n)
    }

    fn non_empty(&self, key: &str, v: Option<String>) -> Result<String, ConfigError> {
        match v {
            Some(s) if !s.trim().is_empty() => Ok(s),
            Some(_) => Err(self.err(key, "must not be empty")),
            None => Err(self.err(key, "is required")),
        }
    }

    fn secret(
        &self,
        env_key: &str,
        env: Option<String>,
        file_key: &str,
        file: Option<PathBuf>,
    ) -> Result<SecretSource, ConfigError> {
        match (env, file) {
            (Some(_), Some(_)) => Err(self.err(
                file_key,
                format!("set either {env_key} or {file_key}, not both"),
            )),
            (Some(e), None) if !e.trim().is_empty() => Ok(SecretSource::Env(e)),
            (None, Some(f)) => Ok(SecretSource::File(f)),
            _ => Err(self.err(env_key, format!("is required (or {file_key})"))),
        }
    }

    fn url(&self, key: &str, v: &str) -> Result<String, ConfigError> {
        let u = url::Url::parse(v.trim())
            .map_err(|e| self.err(key, format!("{v:?} is not a URL ({e})")))?;
        if !matches!(u.scheme(), "http" | "https") {
            return Err(self.err(key, "must be an http:// or https:// URL"));
        }
        Ok(v.trim().trim_end_matches('/').to_owned())
    }
}

fn anchor(base: &Path, p: PathBuf) -> PathBuf {
    if p.is_relative() { base.join(p) } else { p }
}

impl Config {
    pub(super) fn validate(self, source: &Path, base: &Path) -> Result<Settings, ConfigError> {
        let c = Check { source };
        let p = self.provider;
        let zone = match p.time_zone.as_deref() {
            None => default_zone(),
            Some(z) => parse_zone(z).ok_or_else(|| {
                c.err(
                    "provider.time_zone",
                    format!("{z:?} is not an offset like \"+08:00\""),
                )
            })?,
        };
        let provider = match p.kind.as_str() {
            "payprotocol" => {
                for (key, set) in [
                    ("provider.access_key_id", p.access_key_id.is_some()),
                    (
                        "provider.access_key_secret_env",
                        p.access_key_secret_env.is_some(),
                    ),
                    (
                        "provider.access_key_secret_file",
                        p.access_key_secret_file.is_some(),
                    ),
                    ("provider.brand", p.brand.is_some()),
                    ("provider.status_map", !p.status_map.is_empty()),
                ] {
                    if set {
                        return Err(
                            c.err(key, "is a genauth key; provider.kind is \"payprotocol\"")
                        );
                    }
                }
                let mut decimals = HashMap::new();
                for (k, d) in p.decimals {
                    let key = format!("provider.decimals.\"{k}\"");
                    let (chain, sym) = k
                        .split_once(':')
                        .and_then(|(ch, sym)| Some((ch.trim().parse::<i64>().ok()?, sym.trim())))
                        .filter(|(_, sym)| !sym.is_empty())
                        .ok_or_else(|| {
                            c.err(&key, "keys are \"<chainId>:<SYMBOL>\", e.g. \"1:USDT\"")
                        })?;
                    if d > 77 {
                        return Err(c.err(&key, format!("{d} decimals is not plausible")));
                    }
                    decimals.insert((chain, sym.to_ascii_uppercase()), d);
                }
                ProviderConfig::PayProtocol {
                    base_url: c.url("provider.base_url", &p.base_url)?,
                    api_key: c.non_empty("provider.api_key", p.api_key)?,
                    api_secret: c.secret(
                        "provider.api_secret_env",
                        p.api_secret_env,
                        "provider.api_secret_file",
                        p.api_secret_file.map(|f| anchor_secret(base, f)),
                    )?,
                    naive_zone: zone,
                    decimals,
                }
            }
            "genauth" => {
                for (key, set) in [
                    ("provider.api_key", p.api_key.is_some()),
                    ("provider.api_secret_env", p.api_secret_env.is_some()),
                    ("provider.api_secret_file", p.api_secret_file.is_some()),
                    ("provider.decimals", !p.decimals.is_empty()),
                ] {
                    if set {
                        return Err(
                            c.err(key, "is a payprotocol key; provider.kind is \"genauth\"")
                        );
                    }
                }
                let brand = match p.brand.as_deref() {
                    None => Brand::GenAuth,
                    Some(b) => b.parse::<Brand>().map_err(|_| {
                        c.err(
                            "provider.brand",
                            format!("{b:?} is not \"genauth\" or \"authing\""),
                        )
                    })?,
                };
                let mut status_map = default_status_map();
                for (code, name) in p.status_map {
                    let st = PayStatus::from_name(&name).ok_or_else(|| {
                        c.err(
                            &format!("provider.status_map.\"{code}\""),
                            format!("{name:?} is not a status (one of {})", status_names()),
                        )
                    })?;
                    status_map.insert(code, st);
                }
                ProviderConfig::GenAuth {
                    base_url: c.url("provider.base_url", &p.base_url)?,
                    access_key_id: c.non_empty("provider.access_key_id", p.access_key_id)?,
                    access_key_secret: c.secret(
                        "provider.access_key_secret_env",
                        p.access_key_secret_env,
                        "provider.access_key_secret_file",
                        p.access_key_secret_file.map(|f| anchor_secret(base, f)),
                    )?,
                    brand,
                    lang: p.lang.filter(|l| !l.trim().is_empty()),
                    status_map,
                    naive_zone: zone,
                }
            }
            other => {
                return Err(c.err(
                    "provider.kind",
                    format!("unknown provider {other:?} (expected \"payprotocol\" or \"genauth\")"),
                ));
            }
        };

        let f = self.fetch;
        let rate_limit = f.rate_limit.unwrap_or(DEFAULT_RATE_LIMIT);
        if !(rate_limit.is_finite() && rate_limit > 0.0) {
            return Err(c.err(
                "fetch.rate_limit",
                format!("must be a positive number of requests per second, got {rate_limit}"),
            ));
        }
        let backoff_base = c.positive_duration(
            "fetch.backoff_base",
            f.backoff_base.as_deref(),
            DEFAULT_BACKOFF_BASE,
        )?;
        let backoff_max = c.positive_duration(
            "fetch.backoff_max",
            f.backoff_max.as_deref(),
            DEFAULT_BACKOFF_MAX,
        )?;
        if backoff_max < backoff_base {
            return Err(c.err(
                "fetch.backoff_max",
                "must not be shorter than fetch.backoff_base",
            ));
        }
        let fetch = FetchSettings {
            concurrency: c.positive_int(
                "fetch.concurrency",
                f.concurrency,
                DEFAULT_CONCURRENCY as i64,
                4096,
            )? as usize,
            rate_limit,
            burst: c.positive_int("fetch.burst", f.burst, i64::from(DEFAULT_BURST), 100_000)?
                as u32,
            timeout: c.positive_duration("fetch.timeout", f.timeout.as_deref(), DEFAULT_TIMEOUT)?,
            retry: RetryPolicy {
                max_attempts: c.positive_int(
                    "fetch.max_attempts",
                    f.max_attempts,
                    i64::from(DEFAULT_MAX_ATTEMPTS),
                    100,
                )? as u32,
                backoff_base,
                backoff_max,
            },
            max_body: c.positive_int(
                "fetch.max_body",
                f.max_body,
                DEFAULT_MAX_BODY as i64,
                1 << 30,
            )? as usize,
            client: ClientOptions {
                extra_roots: match f.ca_file.map(|p| anchor(base, p)) {
                    None => ExtraRoots::default(),
                    Some(path) => {
                        let key = "fetch.ca_file";
                        let pem = std::fs::read(&path).map_err(|e| {
                            c.err(key, format!("cannot read {}: {e}", path.display()))
                        })?;
                        ExtraRoots::from_pem(&pem)
                            .map_err(|e| c.err(key, format!("{} {e}", path.display())))?
                    }
                },
                http2_prior_knowledge: f.http2_prior_knowledge.unwrap_or(false),
            },
        };

        let s = self.settle;
        let backoff_factor = s.backoff_factor.unwrap_or(DEFAULT_POLL_BACKOFF);
        if !(backoff_factor.is_finite() && (1.0..=10.0).contains(&backoff_factor)) {
            return Err(c.err(
                "settle.backoff_factor",
                format!("must be between 1.0 and 10.0, got {backoff_factor}"),
            ));
        }
        let unsettled = match s.unsettled {
            None => DEFAULT_UNSETTLED.into_iter().collect(),
            Some(names) => {
                let mut set = BTreeSet::new();
                for n in names {
                    let st = PayStatus::from_name(&n).ok_or_else(|| {
                        c.err(
                            "settle.unsettled",
                            format!("{n:?} is not a status (one of {})", status_names()),
                        )
                    })?;
                    if matches!(st, PayStatus::Error | PayStatus::NotFound) {
                        return Err(c.err(
                            "settle.unsettled",
                            format!("{n:?} cannot be listed: errors are always retried, not_found is final"),
                        ));
                    }
                    set.insert(st);
                }
                set
            }
        };
        let settle = SettleSettings {
            poll_interval: c.positive_duration(
                "settle.poll_interval",
                s.poll_interval.as_deref(),
                DEFAULT_POLL_INTERVAL,
            )?,
            backoff_factor,
            max_poll_interval: c.positive_duration(
                "settle.max_poll_interval",
                s.max_poll_interval.as_deref(),
                DEFAULT_MAX_POLL_INTERVAL,
            )?,
            confirming_interval: c.positive_duration(
                "settle.confirming_interval",
                s.confirming_interval.as_deref(),
                DEFAULT_CONFIRMING_INTERVAL,
            )?,
            max_wait: c.positive_duration(
                "settle.max_wait",
                s.max_wait.as_deref(),
                DEFAULT_MAX_WAIT,
            )?,
            wait: c.duration("settle.wait", s.wait.as_deref(), DEFAULT_RUN_WAIT)?,
            unsettled,
        };

        let i = self.input;
        let column = i.column.unwrap_or_else(|| DEFAULT_COLUMN.to_owned());
        if column.trim().is_empty() {
            return Err(c.err("input.column", "must not be empty"));
        }
        let input = InputSettings {
            column,
            payment_no_column: i.payment_no_column.filter(|s| !s.trim().is_empty()),
            files: i.files.into_iter().map(|p| anchor(base, p)).collect(),
            queue_files: i.queue_files.into_iter().map(|p| anchor(base, p)).collect(),
            rotated_dir: match i.rotated_dir {
                Some(d) if d.as_os_str().is_empty() => {
                    return Err(c.err("input.rotated_dir", "must not be empty"));
                }
                d => d,
            },
            inbox_dir: i.inbox_dir.map(|p| anchor(base, p)),
        };

        let o = self.output;
        let format = match o.format.as_deref() {
            None => Format::Jsonl,
            Some(f) => f.parse::<Format>().map_err(|_| {
                c.err(
                    "output.format",
                    format!("{f:?} is not \"jsonl\", \"csv\" or \"parquet\""),
                )
            })?,
        };
        if !format.is_supported() {
            return Err(c.err(
                "output.format",
                format!("this paysync was built without the {format} cargo feature"),
            ));
        }
        let compression = match o.compression.as_deref() {
            None => None,
            Some(v) => Some(
                v.parse::<Compression>()
                    .map_err(|m| c.err("output.compression", m))?,
            ),
        };
        let path_template = match o.path_template.as_deref() {
            None => PathTemplate::default(),
            Some(t) => t
                .parse::<PathTemplate>()
                .map_err(|e| c.err("output.path_template", e.to_string()))?,
        };
        let output = OutputSettings {
            dir: anchor(
                base,
                o.dir.unwrap_or_else(|| PathBuf::from(DEFAULT_OUTPUT_DIR)),
            ),
            format,
            compression,
            path_template,
        };
        output
            .encoding()
            .map_err(|m| c.err("output.compression", m))?;

        let schedule = ScheduleSettings {
            ingest: check_cron(&c, "schedule.ingest", self.schedule.ingest)?,
            export: check_cron(&c, "schedule.export", self.schedule.export)?,
        };
        let state = StateSettings {
            path: anchor(
                base,
                self.state
                    .path
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_PATH)),
            ),
        };
        let m = self.metrics;
        let token = match (m.bearer_token_env, m.bearer_token_file) {
            (None, None) => None,
            (env, file) => Some(c.secret(
                "metrics.bearer_token_env",
                env,
                "metrics.bearer_token_file",
                file.map(|f| anchor_secret(base, f)),
            )?),
        };
        let tls = match (m.tls_cert_file, m.tls_key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(MetricsTls {
                cert: anchor(base, cert),
                key: SecretSource::File(anchor_secret(base, key)),
            }),
            (Some(_), None) => {
                return Err(c.err(
                    "metrics.tls_key_file",
                    "is required with metrics.tls_cert_file",
                ));
            }
            (None, Some(_)) => {
                return Err(c.err(
                    "metrics.tls_cert_file",
                    "is required with metrics.tls_key_file",
                ));
            }
        };
        let metrics = MetricsSettings {
            listen: match m.listen.as_deref().map(str::trim) {
                None | Some("") => None,
                Some(a) => {
                    let addr: std::net::SocketAddr = a.parse().map_err(|_| {
                        c.err(
                            "metrics.listen",
                            format!("{a:?} is not an address like \"127.0.0.1:9184\""),
                        )
                    })?;
                    if !addr.ip().is_loopback() && token.is_none() {
                        tracing::warn!(%addr, "metrics.listen is not a loopback address and no metrics.bearer_token_* is set; the endpoint is unauthenticated");
                    } else if !addr.ip().is_loopback() && tls.is_none() {
                        tracing::warn!(%addr, "metrics.listen is not a loopback address and no metrics.tls_cert_file is set; the bearer token travels in clear");
                    }
                    Some(addr)
                }
            },
            token,
            tls,
        };
        Ok(Settings {
            source: source.to_owned(),
            provider,
            fetch,
            settle,
            input,
            output,
            schedule,
            state,
            metrics,
        })
    }
}

/// Secret files: absolute paths stay; a bare name stays relative so that it can be
/// found in `$CREDENTIALS_DIRECTORY`; other relative paths anchor at the config dir.
fn anchor_secret(base: &Path, p: PathBuf) -> PathBuf {
    if p.components().count() == 1 && p.is_relative() {
        if base.join(&p).exists() {
            base.join(p)
        } else {
            p
        }
    } else {
        anchor(base, p)
    }
}

/// A cron expression has six fields (seconds first).
fn check_cron(c: &Check<'_>, key: &str, v: Option<String>) -> Result<Option<String>, ConfigError> {
    let Some(expr) = v.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    let fields = expr.split_whitespace().count();
    if fields != 6 {
        return Err(c.err(
            key,
            format!("{expr:?} has {fields} fields; use 6 (sec min hour day month weekday), e.g. \"0 */5 * * * *\""),
        ));
    }
    crate::daemon::parse_cron(&expr)
        .map_err(|e| c.err(key, format!("not a cron expression: {e}")))?;
    Ok(Some(expr))
}

fn status_names() -> String {
    PayStatus::ALL.map(PayStatus::as_str).join(", ")
}
