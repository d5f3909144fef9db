//! Where data files go under `output.dir`: `output.path_template` (Hive-style
//! partitions such as `{provider}/dt={date}/paysync-{run_id}.{format}`), the
//! durable creation of partition directories, and the run-level `_SUCCESS`
//! marker written beside a run's files.
//!
//! - [`PathTemplate`]: parsed and checked at config load; [`PathTemplate::render`]
//!   gives an [`OutputPath`] (directory under `output.dir` + file stem).
//! - [`BatchKey`]: what the state store keeps as a batch's name, so a crashed
//!   export is finished under the same path and run id whatever the clock says.
//! - [`create_dirs`]: `mkdir -p` that fsyncs each new directory's parent.
//! - [`SuccessMarker`]: the `_SUCCESS` JSON listing the run's files.

use std::fmt;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Format, OutputError, fsync_dir, write_atomic};

/// The template when the config gives none: flat files in `output.dir`.
pub const DEFAULT_TEMPLATE: &str = "paysync-{run_id}.{format}";

/// File name of the run-level marker.
pub const SUCCESS_FILE: &str = "_SUCCESS";

/// The placeholders a template may use.
pub const PLACEHOLDERS: [&str; 7] = [
    "provider", "date", "year", "month", "day", "run_id", "format",
];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Var(&'static str),
}

/// A checked `output.path_template`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    raw: String,
    parts: Vec<Part>,
}

/// Why a template was refused (the config error names the key).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TemplateError(String);

impl Default for PathTemplate {
    fn default() -> Self {
        DEFAULT_TEMPLATE
            .parse()
            .expect("the default template is valid")
    }
}

impl fmt::Display for PathTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl FromStr for PathTemplate {
    type Err = TemplateError;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let err = |m: String| Err(TemplateError(m));
        let mut parts = Vec::new();
        let mut rest = raw;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                None => {
                    parts.push(Part::Lit(rest.to_owned()));
                    rest = "";
                }
                Some(i) if rest.as_bytes()[i] == b'}' => {
                    return err(format!("unmatched '}}' in {raw:?}"));
                }
                Some(i) => {
                    if i > 0 {
                        parts.push(Part::Lit(rest[..i].to_owned()));
                    }
                    let Some(end) = rest[i..].find('}') else {
                        return err(format!("unmatched '{{' in {raw:?}"));
                    };
                    let name = &rest[i + 1..i + end];
                    let Some(var) = PLACEHOLDERS.iter().find(|p| **p == name) else {
                        return err(format!(
                            "unknown placeholder {{{name}}} in {raw:?}; known: {}",
                            PLACEHOLDERS.map(|p| format!("{{{p}}}")).join(", ")
                        ));
                    };
                    parts.push(Part::Var(var));
                    rest = &rest[i + end + 1..];
                }
            }
        }
        if !parts.contains(&Part::Var("run_id")) {
            return err(format!(
                "{raw:?} lacks {{run_id}}; without it two runs would write the same file"
            ));
        }
        let ends_with_format = parts.len() >= 2
            && parts[parts.len() - 1] == Part::Var("format")
            && matches!(&parts[parts.len() - 2], Part::Lit(l) if l.ends_with('.'));
        if !ends_with_format {
            return err(format!(
                "{raw:?} must end with \".{{format}}\" (compressed text files get .gz or .zst after it)"
            ));
        }
        let this = Self {
            raw: raw.to_owned(),
            parts,
        };
        // Placeholder values never contain '/', so checking a rendering with
        // plain values checks the literal structure.
        let sample = this.render_raw("p", "r", Utc::now(), Format::Jsonl);
        check_relative(&sample).map_err(|m| TemplateError(format!("{raw:?}: {m}")))?;
        Ok(this)
    }
}

/// Relative, normal components only, no hidden (dot) names.
fn check_relative(path: &str) -> Result<(), String> {
    if path.starts_with('/') {
        return Err("must be relative to output.dir".into());
    }
    for part in path.split('/') {
        if part.is_empty() {
            return Err("has an empty path component (\"//\" or a trailing \"/\")".into());
        }
        if part == "." || part == ".." {
            return Err(format!("must not use {part:?}"));
        }
        if part.starts_with('.') || part.starts_with('_') {
            return Err(format!(
                "component {part:?} starts with '.' or '_', which loaders treat as hidden"
            ));
        }
    }
    let p = Path::new(path);
    if !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err("must be a plain relative path".into());
    }
    Ok(())
}

/// Where one data file goes: `<output.dir>/<dir>/<stem>.<ext>` and
/// `<output.dir>/<dir>/<stem>.manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputPath {
    /// Directory under `output.dir` (empty for the top level).
    pub dir: PathBuf,
    /// File name without the extension.
    pub stem: String,
}

impl OutputPath {
    /// `dir/stem` as one `/`-separated string (a [`BatchKey`]'s path).
    pub fn joined(&self) -> String {
        let dir = self.dir.to_string_lossy();
        if dir.is_empty() {
            self.stem.clone()
        } else {
            format!("{dir}/{}", self.stem)
        }
    }

    /// Splits a `/`-separated `dir/stem`.
    pub fn from_joined(joined: &str) -> Self {
        match joined.rsplit_once('/') {
            Some((dir, stem)) => Self {
                dir: PathBuf::from(dir),
                stem: stem.to_owned(),
            },
            None => Self {
                dir: PathBuf::new(),
                stem: joined.to_owned(),
            },
        }
    }
}

impl PathTemplate {
    fn render_raw(
        &self,
        provider: &str,
        run_id: &str,
        at: DateTime<Utc>,
        format: Format,
    ) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Lit(l) => out.push_str(l),
                Part::Var("provider") => out.push_str(provider),
                Part::Var("run_id") => out.push_str(run_id),
                Part::Var("date") => out.push_str(&at.format("%Y-%m-%d").to_string()),
                Part::Var("year") => out.push_str(&at.format("%Y").to_string()),
                Part::Var("month") => out.push_str(&at.format("%m").to_string()),
                Part::Var("day") => out.push_str(&at.format("%d").to_string()),
                Part::Var(_) => out.push_str(format.as_str()),
            }
        }
        out
    }

    /// The path of a run's data file: placeholders filled (`{date}` and its
    /// parts are the UTC date of `at`, the export), the final `.{format}` cut
    /// off to give the stem.
    pub fn render(
        &self,
        provider: &str,
        run_id: &str,
        at: DateTime<Utc>,
        format: Format,
    ) -> OutputPath {
        let full = self.render_raw(provider, run_id, at, format);
        let without_ext = full
            .strip_suffix(format.as_str())
            .and_then(|s| s.strip_suffix('.'))
            .unwrap_or(&full);
        OutputPath::from_joined(without_ext)
    }
}

/// A batch's name in the state store: `<run id>|<dir/stem>`. Names written
/// before templates existed (`paysync-<run id>`, flat) still decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchKey {
    pub run_id: String,
    pub path: OutputPath,
}

impl BatchKey {
    pub fn encode(&self) -> String {
        format!("{}|{}", self.run_id, self.path.joined())
    }

    pub fn decode(name: &str) -> Self {
        match name.split_once('|') {
            Some((run_id, path)) => Self {
                run_id: run_id.to_owned(),
                path: OutputPath::from_joined(path),
            },
            None => Self {
                run_id: name.strip_prefix("paysync-").unwrap_or(name).to_owned(),
                path: OutputPath::from_joined(name),
            },
        }
    }
}

/// Mode of the directories paysync creates (output and partitions), whatever
/// the umask: like the files' 0640, no access for others.
pub const DIR_MODE: u32 = 0o750;

/// `mkdir -p dir` (new directories get [`DIR_MODE`]), fsyncing the parent of
/// every directory it creates so that the new directory entries survive a
/// crash. A path that exists but is
/// not a directory is an error saying so.
pub fn create_dirs(dir: &Path) -> Result<(), OutputError> {
    let target = dir.to_owned();
    let not_a_dir = |path: &Path| OutputError::CreateDir {
        path: path.to_owned(),
        source: io::Error::new(
            io::ErrorKind::AlreadyExists,
            "it exists and is not a directory",
        ),
    };
    let mut missing = Vec::new();
    let mut cur = target.clone();
    loop {
        match std::fs::metadata(&cur) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => return Err(not_a_dir(&cur)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(cur.clone()),
            Err(source) => return Err(OutputError::CreateDir { path: cur, source }),
        }
        match cur.parent() {
            Some(p) if !p.as_os_str().is_empty() => cur = p.to_owned(),
            _ => break,
        }
    }
    for dir in missing.iter().rev() {
        match std::fs::DirBuilder::new().mode(DIR_MODE).create(dir) {
            // The umask may have taken bits away, or added none: set it exactly.
            Ok(()) => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))
                .map_err(|source| OutputError::CreateDir {
                    path: dir.clone(),
                    source,
                })?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(not_a_dir(dir)),
            Err(source) => {
                return Err(OutputError::CreateDir {
                    path: dir.clone(),
                    source,
                });
            }
        }
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            fsync_dir(parent)?;
        }
    }
    Ok(())
}

/// One committed file in a [`SuccessMarker`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuccessFile {
    /// The data file, relative to `output.dir`.
    pub data_file: String,
    /// Its manifest, relative to `output.dir`.
    pub manifest: String,
    pub rows: u64,
    pub sha256: String,
}

/// `_SUCCESS`: written (atomically, replacing an older one) into the directory
/// of a run's data file once the file and its manifest are committed. It names
/// the run and lists its files; the per-file manifests stay the authority.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuccessMarker {
    pub run_id: String,
    pub provider: String,
    pub schema_version: u32,
    pub finished_at: String,
    pub files: Vec<SuccessFile>,
}

impl SuccessMarker {
    /// Writes `<dir>/_SUCCESS`.
    pub fn write(&self, dir: &Path) -> Result<PathBuf, OutputError> {
        let mut json = serde_json::to_vec_pretty(self).map_err(|e| OutputError::Write {
            path: dir.join(SUCCESS_FILE),
            source: io::Error::other(e),
        })?;
        json.push(b'\n');
        write_atomic(dir, SUCCESS_FILE, &json)?;
        Ok(dir.join(SUCCESS_FILE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-23T23:59:59.999Z")
            .unwrap()
            .to_utc()
    }

    /// Placeholders fill in; `{date}` is the UTC date; the stem drops the final
    /// `.{format}`; the default template gives the flat pre-template names.
    #[test]
    fn render() {
        let t: PathTemplate = "{provider}/dt={date}/paysync-{run_id}.{format}"
            .parse()
            .unwrap();
        let p = t.render("genauth", "R1", at(), Format::Parquet);
        assert_eq!(p.dir, PathBuf::from("genauth/dt=2026-11-23"));
        assert_eq!(p.stem, "paysync-R1");
        let t: PathTemplate = "y={year}/m={month}/d={day}/{format}-{run_id}.{format}"
            .parse()
            .unwrap();
        let p = t.render("p", "R", at(), Format::Csv);
        assert_eq!(p.joined(), "y=2026/m=11/d=23/csv-R");
        let p = PathTemplate::default().render("p", "R2", at(), Format::Jsonl);
        assert_eq!((p.dir, p.stem.as_str()), (PathBuf::new(), "paysync-R2"));
    }

    /// Bad templates are refused with a reason.
    #[test]
    fn refused_templates() {
        for (t, why) in [
            ("out.{format}", "{run_id}"),
            ("{run_id}.jsonl", "must end with"),
            ("{run_id}", "must end with"),
            ("{run_id}{format}", "must end with"),
            ("/abs/{run_id}.{format}", "relative"),
            ("../{run_id}.{format}", "\"..\""),
            ("a//{run_id}.{format}", "empty path component"),
            ("a/./{run_id}.{format}", "\".\""),
            (".hidden/{run_id}.{format}", "hidden"),
            ("_tmp/{run_id}.{format}", "hidden"),
            ("{colour}/{run_id}.{format}", "unknown placeholder {colour}"),
            ("{run_id.{format}", "unknown placeholder"),
            ("x}/{run_id}.{format}", "unmatched '}'"),
            ("{run_id}.{format", "unmatched '{'"),
        ] {
            let e = t.parse::<PathTemplate>().unwrap_err().to_string();
            assert!(e.contains(why), "{t}: {e}");
        }
    }

    /// Batch keys round-trip, and old flat names decode to the same path.
    #[test]
    fn batch_keys() {
        let k = BatchKey {
            run_id: "20261123T000000.000Z-ab12".into(),
            path: OutputPath::from_joined("payprotocol/dt=2026-11-23/paysync-x"),
        };
        assert_eq!(BatchKey::decode(&k.encode()), k);
        let old = BatchKey::decode("paysync-20261123T000000.000Z-ab12");
        assert_eq!(old.run_id, "20261123T000000.000Z-ab12");
        assert_eq!(old.path.dir, PathBuf::new());
        assert_eq!(old.path.stem, "paysync-20261123T000000.000Z-ab12");
    }

    /// Missing partition directories are created; existing ones are fine.
    #[test]
    fn create_dirs_nested() {
        let root = tempfile::tempdir().unwrap();
        create_dirs(&root.path().join("a/b=1/c")).unwrap();
        assert!(root.path().join("a/b=1/c").is_dir());
        for d in ["a", "a/b=1", "a/b=1/c"] {
            let mode = std::fs::metadata(root.path().join(d))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, DIR_MODE, "{d}");
        }
        create_dirs(&root.path().join("a/b=1/c")).unwrap();
        create_dirs(root.path()).unwrap();
        std::fs::write(root.path().join("file"), b"x").unwrap();
        for rel in ["file", "file/sub"] {
            let e = create_dirs(&root.path().join(rel)).unwrap_err();
            assert!(matches!(e, OutputError::CreateDir { .. }), "{e:?}");
            let msg = format!("{e}: {}", std::error::Error::source(&e).unwrap());
            assert!(msg.contains("cannot create output directory"), "{msg}");
            assert!(msg.contains("/file"), "{msg}");
        }
    }
}
