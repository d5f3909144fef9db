//! Config validation: every bad value names the file and the key.

use super::*;

const MINIMAL: &str = r#"
[provider]
kind = "payprotocol"
base_url = "http://127.0.0.1:8080/api/mer/"
api_key = "k"
api_secret_env = "PAYSYNC_TEST_UNSET_SECRET"
"#;

fn load(text: &str) -> Result<Settings, ConfigError> {
    Settings::from_toml(
        text,
        Path::new("/etc/paysync/test.toml"),
        Path::new("/srv/paysync"),
    )
}

fn err(text: &str) -> String {
    load(text)
        .expect_err("config should be refused")
        .to_string()
}

/// The shipped example config loads, and lists the documented defaults.
#[test]
fn example_config_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml.example");
    let s = Settings::load(&path).unwrap();
    assert_eq!(s.provider.kind(), ProviderKind::PayProtocol);
    assert_eq!(s.fetch.concurrency, DEFAULT_CONCURRENCY);
    assert_eq!(s.fetch.rate_limit, DEFAULT_RATE_LIMIT);
    assert_eq!(s.fetch.timeout, DEFAULT_TIMEOUT);
    assert_eq!(s.settle.max_wait, DEFAULT_MAX_WAIT);
    assert_eq!(s.settle.wait, DEFAULT_RUN_WAIT);
    assert_eq!(s.output.format, Format::Jsonl);
    assert_eq!(s.schedule.export.as_deref(), Some("0 0 2 * * *"));
}

/// Defaults apply to a minimal file; relative paths anchor at the config's directory.
#[test]
fn defaults_and_relative_paths() {
    let s = load(MINIMAL).unwrap();
    assert_eq!(s.state.path, Path::new("/srv/paysync/paysync.db"));
    assert_eq!(s.output.dir, Path::new("/srv/paysync/out"));
    assert_eq!(s.input.column, "order_no");
    assert_eq!(s.settle.unsettled, DEFAULT_UNSETTLED.into_iter().collect());
    match s.provider {
        ProviderConfig::PayProtocol { base_url, .. } => {
            assert_eq!(base_url, "http://127.0.0.1:8080/api/mer")
        }
        ProviderConfig::GenAuth { .. } => panic!("wrong provider"),
    }
}

/// Output keys: format, compression (default per format) and path template.
#[test]
fn output_encoding_and_layout() {
    let s = load(MINIMAL).unwrap();
    assert_eq!(s.output.encoding().unwrap().extension(), "jsonl");
    assert_eq!(s.output.path_template, PathTemplate::default());
    let s = load(&format!(
        "{MINIMAL}[output]\nformat = \"parquet\"\npath_template = \"{{provider}}/dt={{date}}/p-{{run_id}}.{{format}}\"\n"
    ))
    .unwrap();
    let e = s.output.encoding().unwrap();
    assert_eq!(
        (e.format, e.compression),
        (Format::Parquet, Compression::Zstd)
    );
    assert_eq!(
        s.output.path_template.to_string(),
        "{provider}/dt={date}/p-{run_id}.{format}"
    );
    let s = load(&format!(
        "{MINIMAL}[output]\nformat = \"csv\"\ncompression = \"gzip\"\n"
    ))
    .unwrap();
    assert_eq!(s.output.encoding().unwrap().extension(), "csv.gz");
}

/// Each kind of mistake is reported with the file and the key.
#[test]
fn errors_name_file_and_key() {
    let cases: &[(&str, &str)] = &[
        ("[fetch]\nrate = 3\n", "rate"),
        ("[fetch]\nrate_limit = \"fast\"\n", "rate_limit"),
        ("[fetch]\nrate_limit = -1.0\n", "fetch.rate_limit"),
        ("[fetch]\nrate_limit = 0.0\n", "fetch.rate_limit"),
        ("[fetch]\nconcurrency = 0\n", "fetch.concurrency"),
        ("[fetch]\ntimeout = \"ten seconds\"\n", "fetch.timeout"),
        ("[fetch]\ntimeout = \"0s\"\n", "fetch.timeout"),
        ("[settle]\nmax_wait = \"3 fortnights\"\n", "settle.max_wait"),
        (
            "[settle]\nunsettled = [\"pending\", \"limbo\"]\n",
            "settle.unsettled",
        ),
        ("[output]\nformat = \"xml\"\n", "output.format"),
        ("[output]\ncompression = \"lz4\"\n", "output.compression"),
        (
            "[output]\nformat = \"csv\"\ncompression = \"snappy\"\n",
            "output.compression",
        ),
        (
            "[output]\npath_template = \"out.{format}\"\n",
            "output.path_template",
        ),
        (
            "[output]\npath_template = \"../{run_id}.{format}\"\n",
            "output.path_template",
        ),
        (
            "[output]\npath_template = \"{hour}/{run_id}.{format}\"\n",
            "output.path_template",
        ),
        ("[schedule]\nexport = \"0 2 * * *\"\n", "schedule.export"),
        (
            "[schedule]\ningest = \"0 */5 * * * Funday\"\n",
            "schedule.ingest",
        ),
        ("[metrics]\nlisten = \"localhost\"\n", "metrics.listen"),
        ("[input]\nrotated_dir = \"\"\n", "input.rotated_dir"),
        (
            "[fetch]\nhttp2_prior_knowledge = \"yes\"\n",
            "http2_prior_knowledge",
        ),
        (
            "[metrics]\nbearer_token_env = \"X\"\nbearer_token_file = \"t\"\n",
            "metrics.bearer_token_file",
        ),
        (
            "[metrics]\nbearer_token_env = \" \"\n",
            "metrics.bearer_token_env",
        ),
        (
            "[metrics]\ntls_cert_file = \"c.pem\"\n",
            "metrics.tls_key_file",
        ),
        ("[wat]\nx = 1\n", "wat"),
    ];
    for (extra, key) in cases {
        let msg = err(&format!("{MINIMAL}{extra}"));
        assert!(msg.contains("/etc/paysync/test.toml"), "{msg}");
        assert!(msg.contains(key), "{key} not in: {msg}");
    }
}

#[test]
fn provider_errors() {
    let msg = err("[provider]\nkind = \"stripe\"\nbase_url = \"http://x\"\n");
    assert!(
        msg.contains("provider.kind") && msg.contains("stripe"),
        "{msg}"
    );
    let msg = err(
        "[provider]\nkind = \"payprotocol\"\nbase_url = \"http://x\"\napi_secret_env = \"X\"\n",
    );
    assert!(msg.contains("provider.api_key"), "{msg}");
    let msg = err("[provider]\nkind = \"payprotocol\"\nbase_url = \"http://x\"\napi_key = \"k\"\n");
    assert!(msg.contains("provider.api_secret_env"), "{msg}");
    let msg = err(
        "[provider]\nkind = \"payprotocol\"\nbase_url = \"ftp://x\"\napi_key = \"k\"\napi_secret_env = \"X\"\n",
    );
    assert!(msg.contains("provider.base_url"), "{msg}");
    let msg = err(&format!("{MINIMAL}brand = \"authing\"\n"));
    assert!(msg.contains("provider.brand"), "{msg}");
    let msg = err(&format!("{MINIMAL}[provider.decimals]\n\"USDT\" = 6\n"));
    assert!(msg.contains("provider.decimals"), "{msg}");
    let ga = "[provider]\nkind = \"genauth\"\nbase_url = \"https://api.genauth.ai/\"\naccess_key_id = \"id\"\naccess_key_secret_env = \"X\"\n";
    let s = load(ga).unwrap();
    assert_eq!(s.provider.kind(), ProviderKind::GenAuth);
    let msg = err(&format!(
        "{ga}[provider.status_map]\n\"7\" = \"settled-ish\"\n"
    ));
    assert!(
        msg.contains("provider.status_map") && msg.contains("settled-ish"),
        "{msg}"
    );
    let msg = err(&format!("{ga}brand = \"okta\"\n"));
    assert!(msg.contains("provider.brand"), "{msg}");
}

/// A missing secret is reported by its key and variable name, never a value.
#[test]
fn missing_secret_names_the_variable() {
    let s = load(MINIMAL).unwrap();
    let Err(e) = s.provider_settings() else {
        panic!("secret should be missing")
    };
    let msg = e.to_string();
    assert!(msg.contains("provider.api_secret_env"), "{msg}");
    assert!(msg.contains("PAYSYNC_TEST_UNSET_SECRET"), "{msg}");
}

/// Secret files are read and trimmed of their final newline.
#[test]
fn secret_from_file() {
    use secrecy::ExposeSecret;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), "s3cr3t\n").unwrap();
    let text = MINIMAL.replace(
        "api_secret_env = \"PAYSYNC_TEST_UNSET_SECRET\"",
        "api_secret_file = \"secret\"",
    );
    let s = Settings::from_toml(&text, &dir.path().join("c.toml"), dir.path()).unwrap();
    let ProviderSettings::PayProtocol(p) = s.provider_settings().unwrap() else {
        panic!("wrong provider")
    };
    assert_eq!(p.api_secret.expose_secret(), "s3cr3t");
}

#[test]
fn zones() {
    assert_eq!(parse_zone("+08:00").unwrap().local_minus_utc(), 8 * 3600);
    assert_eq!(
        parse_zone("-05:30").unwrap().local_minus_utc(),
        -(5 * 3600 + 30 * 60)
    );
    assert_eq!(parse_zone("UTC").unwrap().local_minus_utc(), 0);
    assert!(parse_zone("CST").is_none());
    assert!(parse_zone("+25:00").is_none());
}

/// `fetch.ca_file` is read relative to the config's directory; a missing file, a
/// file without a certificate and a certificate that is not one are refused with
/// the key, the config file and the CA file named.
#[test]
fn ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    let load_ca = |name: &str| {
        let text = format!("{MINIMAL}[fetch]\nca_file = \"{name}\"\n");
        Settings::from_toml(&text, &config, dir.path())
    };
    assert!(load(MINIMAL).unwrap().fetch.client.extra_roots.is_empty());

    let ca = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/e2e/fixtures/test-ca.pem"
    );
    let pem = std::fs::read_to_string(ca).unwrap();
    // A bundle may carry other sections; only certificates count.
    let bundle =
        format!("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n{pem}{pem}");
    std::fs::write(dir.path().join("ca.pem"), bundle).unwrap();
    assert_eq!(load_ca("ca.pem").unwrap().fetch.client.extra_roots.len(), 2);

    std::fs::write(dir.path().join("empty.pem"), "not a certificate\n").unwrap();
    let not_der = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    std::fs::write(dir.path().join("bad.pem"), not_der).unwrap();
    let truncated = pem.replace("-----END CERTIFICATE-----", "");
    std::fs::write(dir.path().join("torn.pem"), truncated).unwrap();
    for (name, says) in [
        ("missing.pem", "cannot read"),
        ("empty.pem", "holds no PEM certificate"),
        ("bad.pem", "certificate 1 of 1 is not usable"),
        ("torn.pem", "is not a PEM file"),
    ] {
        let msg = load_ca(name).expect_err(name).to_string();
        assert!(msg.contains("fetch.ca_file"), "{msg}");
        assert!(msg.contains(&config.display().to_string()), "{msg}");
        assert!(
            msg.contains(&dir.path().join(name).display().to_string()),
            "{msg}"
        );
        assert!(msg.contains(says), "{says:?} not in: {msg}");
    }
}

/// `fetch.http2_prior_knowledge` is off unless set.
#[test]
fn http2_prior_knowledge() {
    assert!(!load(MINIMAL).unwrap().fetch.client.http2_prior_knowledge);
    let on = load(&format!("{MINIMAL}[fetch]\nhttp2_prior_knowledge = true\n")).unwrap();
    assert!(on.fetch.client.http2_prior_knowledge);
}
