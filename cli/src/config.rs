//! The mirrord config file (`-f`, default `.mirrord/mirrord.json`): key names follow upstream
//! mirrord's schema so an existing file keeps working; JSON, TOML or YAML by the file's extension,
//! as upstream reads them. Keys this version does not implement are ignored with a warning
//! (see [`crate::verify`]); command-line flags always win over the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where the config file is looked for when `-f` is not given, in this order.
pub const DEFAULT_PATHS: [&str; 4] = [
    ".mirrord/mirrord.json",
    ".mirrord/mirrord.toml",
    ".mirrord/mirrord.yaml",
    ".mirrord/mirrord.yml",
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}: {source}; check the path given to -f")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the config file {path} is not valid: {source}; fix it (`mirrord verify-config {path}` lists every problem)"
    )]
    Parse { path: PathBuf, source: ParseError },
}

/// The languages a config file can be written in, chosen by its extension (upstream's rule):
/// `.toml`, `.yaml`/`.yml`, anything else JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Toml,
    Yaml,
}

impl Format {
    pub fn of(path: &Path) -> Format {
        let extension = path
            .extension()
            .and_then(|extension| extension.to_str())
            .map(str::to_ascii_lowercase);
        match extension.as_deref() {
            Some("toml") => Format::Toml,
            Some("yaml" | "yml") => Format::Yaml,
            _ => Format::Json,
        }
    }
}

/// What is wrong with a config file's text, and where (1-based, as editors count) when the
/// parser knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", self.place())]
pub struct ParseError {
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl ParseError {
    fn place(&self) -> String {
        match (self.line, self.column) {
            (Some(line), Some(column)) => format!("line {line}, column {column}: "),
            (Some(line), None) => format!("line {line}: "),
            _ => String::new(),
        }
    }

    fn json(error: serde_json::Error) -> ParseError {
        let text = error.to_string();
        let suffix = format!(" at line {} column {}", error.line(), error.column());
        let known = error.line() > 0;
        ParseError {
            line: known.then_some(error.line()),
            column: known.then_some(error.column()),
            message: text.strip_suffix(&suffix).unwrap_or(&text).to_owned(),
        }
    }

    fn toml(error: toml::de::Error, text: &str) -> ParseError {
        let (line, column) = match error.span() {
            Some(span) => {
                let (line, column) = line_column(text, span.start);
                (Some(line), Some(column))
            }
            None => (None, None),
        };
        ParseError {
            line,
            column,
            message: error.message().trim_end().to_owned(),
        }
    }

    fn yaml(error: serde_yaml_ng::Error) -> ParseError {
        let text = error.to_string();
        match error.location() {
            Some(at) => {
                let suffix = format!(" at line {} column {}", at.line(), at.column());
                let message = match text.find(&suffix) {
                    Some(index) => format!("{}{}", &text[..index], &text[index + suffix.len()..]),
                    None => text.clone(),
                };
                ParseError {
                    line: Some(at.line()),
                    column: Some(at.column()),
                    message,
                }
            }
            None => ParseError {
                line: None,
                column: None,
                message: text,
            },
        }
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map_or(0, |rest| rest.chars().count())
        + 1;
    (line, column)
}

#[derive(Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
pub struct Config {
    pub target: Option<TargetConfig>,
    /// The kubeconfig file to use instead of `KUBECONFIG` / `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use instead of its current one.
    pub kube_context: Option<String>,
    #[serde(default)]
    pub feature: Features,
    #[serde(default)]
    pub agent: AgentConfig,
}

/// `"target": "deployment/web"` or, as upstream also allows,
/// `"target": {"path": "deployment/web", "namespace": "shop"}`.
#[derive(Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(untagged)]
pub enum TargetConfig {
    Path(String),
    Detailed {
        path: Option<String>,
        namespace: Option<String>,
    },
}

impl TargetConfig {
    pub fn path(&self) -> Option<&str> {
        match self {
            TargetConfig::Path(path) => Some(path),
            TargetConfig::Detailed { path, .. } => path.as_deref(),
        }
    }

    pub fn namespace(&self) -> Option<&str> {
        match self {
            TargetConfig::Path(_) => None,
            TargetConfig::Detailed { namespace, .. } => namespace.as_deref(),
        }
    }
}

#[derive(Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
pub struct Features {
    #[serde(default)]
    pub env: EnvFeature,
    #[serde(default)]
    pub fs: FsFeature,
    #[serde(default)]
    pub network: NetworkConfig,
}

#[derive(Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
pub struct NetworkConfig {
    #[serde(default)]
    pub incoming: IncomingFeature,
    #[serde(default)]
    pub outgoing: OutgoingFeature,
    #[serde(default)]
    pub dns: DnsFeature,
}

/// `feature.network.incoming`: a mode (`"mirror"`, `"steal"`, `"off"`), or the detailed form.
/// Read from a JSON value by hand so that a mistake is named (serde's untagged enums only say
/// that nothing matched).
#[derive(Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(try_from = "serde_json::Value", untagged)]
#[schemars(!try_from)]
pub enum IncomingFeature {
    Mode(IncomingModeName),
    Detailed(Box<IncomingConfig>),
}

impl Default for IncomingFeature {
    fn default() -> Self {
        IncomingFeature::Mode(IncomingModeName::Mirror)
    }
}

impl TryFrom<serde_json::Value> for IncomingFeature {
    type Error = String;

    fn try_from(value: serde_json::Value) -> Result<Self, String> {
        let key = "feature.network.incoming";
        if value.is_string() {
            serde_json::from_value(value)
                .map(IncomingFeature::Mode)
                .map_err(|e| format!("{key}: {e}"))
        } else if value.is_object() {
            serde_json::from_value(value)
                .map(|detail| IncomingFeature::Detailed(Box::new(detail)))
                .map_err(|e| format!("{key}: {e}"))
        } else {
            Err(format!(
                "{key} is \"mirror\", \"steal\", \"off\" or an object with \"mode\""
            ))
        }
    }
}

#[derive(Debug, Deserialize, Serialize, JsonSchema, PartialEq, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub enum IncomingModeName {
    Mirror,
    Steal,
    Off,
}

/// `feature.network.incoming` as an object. Upstream keys not listed here (`listen_ports`,
/// `ignore_localhost`, `https_delivery`…) are ignored, as everywhere in this file.
#[derive(Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
pub struct IncomingConfig {
    pub mode: Option<IncomingModeName>,
    pub http_filter: Option<HttpFilterConfig>,
    /// `[[local, remote], …]`: the app's local listening port and the target's port it takes.
    #[serde(default)]
    pub port_mapping: Vec<(u16, u16)>,
    /// Only these (remote) ports are taken.
    pub ports: Option<Vec<u16>>,
    /// These (remote) ports are never taken.
    #[serde(default)]
    pub ignore_ports: Vec<u16>,
    pub on_concurrent_steal: Option<ConcurrentSteal>,
}

/// What to do when another session already steals a port without a filter.
#[derive(Debug, Deserialize, Serialize, JsonSchema, PartialEq, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub enum ConcurrentSteal {
    /// The subscription is refused and the session ends.
    Abort,
    /// This session takes the port over.
    Override,
}

/// `feature.network.incoming.http_filter`: exactly one of the filter keys, and the ports it
/// applies to.
#[derive(Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpFilterConfig {
    pub header_filter: Option<String>,
    pub path_filter: Option<String>,
    pub method_filter: Option<String>,
    pub all_of: Option<Vec<InnerFilter>>,
    pub any_of: Option<Vec<InnerFilter>>,
    /// The (remote) ports the filter applies to; default: every port taken.
    pub ports: Option<Vec<u16>>,
}

/// One entry of `all_of` / `any_of`: `{"header": …}`, `{"path": …}` or `{"method": …}`.
#[derive(Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InnerFilter {
    pub header: Option<String>,
    pub path: Option<String>,
    pub method: Option<String>,
}

/// `feature.network.dns`: `true`/`false`, or the detailed form.
#[derive(Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(untagged)]
pub enum DnsFeature {
    Enabled(bool),
    Detailed(DnsConfig),
}

impl Default for DnsFeature {
    fn default() -> Self {
        DnsFeature::Enabled(true)
    }
}

#[derive(Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    pub enabled: Option<bool>,
    /// `local`: these names are resolved here, the rest in the target; `remote`: the reverse.
    pub filter: Option<FilterConfig>,
}

/// `feature.network.outgoing`: `true`/`false`, or the detailed form.
#[derive(Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(untagged)]
pub enum OutgoingFeature {
    Enabled(bool),
    Detailed(OutgoingConfig),
}

impl Default for OutgoingFeature {
    fn default() -> Self {
        OutgoingFeature::Enabled(true)
    }
}

#[derive(Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutgoingConfig {
    /// False: UDP stays on this machine's network.
    pub udp: Option<bool>,
    /// Accepted for upstream compatibility; TCP is always carried when outgoing is on.
    pub tcp: Option<bool>,
    pub filter: Option<FilterConfig>,
    /// Upstream keys with no meaning here; accepted so an upstream file keeps working.
    pub ignore_localhost: Option<bool>,
    pub unix_streams: Option<serde_json::Value>,
}

/// Exactly one of `remote` (only these go through the target) or `local` (these stay here).
#[derive(Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    pub remote: Option<Vec<String>>,
    pub local: Option<Vec<String>>,
}

/// `feature.fs`: a mode (`"read"`), or the detailed form.
#[derive(Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(untagged)]
pub enum FsFeature {
    Mode(FsModeName),
    Detailed(FsConfig),
}

impl Default for FsFeature {
    fn default() -> Self {
        FsFeature::Detailed(FsConfig::default())
    }
}

/// Upstream's mode names; `localwithoverrides` behaves as `local` plus the listed overlays.
#[derive(Debug, Deserialize, Serialize, JsonSchema, PartialEq, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub enum FsModeName {
    Local,
    #[serde(rename = "localwithoverrides")]
    LocalWithOverrides,
    Read,
    Write,
}

#[derive(Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
pub struct FsConfig {
    pub mode: Option<FsModeName>,
    /// Remote paths also overlaid at their own path, read-only.
    pub read_only: Option<PatternList>,
    /// Remote paths also overlaid at their own path, writable (they make the mount writable).
    pub read_write: Option<PatternList>,
    /// Paths never overlaid, default overlays included.
    pub local: Option<PatternList>,
    /// Read extended attributes from the pod (off: the mount has none, as sshfs).
    pub xattrs: Option<bool>,
}

/// `feature.env`: `true`/`false`, or the detailed form.
#[derive(Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(untagged)]
pub enum EnvFeature {
    Enabled(bool),
    Detailed(EnvConfig),
}

impl Default for EnvFeature {
    fn default() -> Self {
        EnvFeature::Enabled(true)
    }
}

#[derive(Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
pub struct EnvConfig {
    pub include: Option<PatternList>,
    pub exclude: Option<PatternList>,
    #[serde(rename = "override", default)]
    pub overrides: BTreeMap<String, String>,
    /// A `.env` file whose variables are set over the target's (as `--env-file`).
    pub env_file: Option<PathBuf>,
}

/// Patterns as one `;`-separated string or as a list.
#[derive(Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(untagged)]
pub enum PatternList {
    Joined(String),
    List(Vec<String>),
}

impl PatternList {
    /// Each entry, for keys that list paths.
    pub fn entries(&self) -> Vec<String> {
        match self {
            PatternList::Joined(joined) => joined
                .split(';')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(str::to_owned)
                .collect(),
            PatternList::List(list) => list.clone(),
        }
    }

    /// The `;`-separated form the command line uses.
    pub fn joined(&self) -> String {
        match self {
            PatternList::Joined(joined) => joined.clone(),
            PatternList::List(list) => list.join(";"),
        }
    }
}

#[derive(Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
pub struct AgentConfig {
    /// Seconds a locally spawned agent stays without a session before exiting; for a
    /// Kubernetes agent, seconds the finished Job is kept before the cluster removes it.
    pub ttl: Option<u64>,
    /// The agent's image in a cluster.
    pub image: Option<String>,
    /// Where the agent Job of a Kubernetes target runs; default: the target's namespace.
    pub namespace: Option<String>,
    /// Seconds a Kubernetes agent may take to start (default 60).
    pub startup_timeout: Option<u64>,
    /// Seconds a Kubernetes agent waits without any session before exiting (default 30), so a
    /// `kill -9` of mirrord leaves nothing running for long.
    pub communication_timeout: Option<u64>,
    /// Run the agent container privileged instead of with the capabilities it needs.
    pub privileged: Option<bool>,
    /// Add the agent to the target's pod as an ephemeral container instead of starting a Job
    /// (for namespaces whose Pod Security level refuses the Job).
    pub ephemeral: Option<bool>,
}

impl Config {
    /// Reads `explicit` if given (it must exist), else the first of [`DEFAULT_PATHS`] that
    /// exists, with the warnings about its keys (unknown ones, upstream ones ignored here).
    pub fn load(explicit: Option<&Path>) -> Result<(Config, Vec<String>), ConfigError> {
        let path = match explicit {
            Some(path) => path.to_path_buf(),
            None => match DEFAULT_PATHS.iter().map(Path::new).find(|p| p.is_file()) {
                Some(path) => path.to_path_buf(),
                None => return Ok((Config::default(), Vec::new())),
            },
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Config::from_text(&text, Format::of(&path))
            .map_err(|source| ConfigError::Parse { path, source })
    }

    /// A config file's text, read as [`Config::load`] reads it: the typed config, with the
    /// warnings about its keys.
    pub fn from_text(text: &str, format: Format) -> Result<(Config, Vec<String>), ParseError> {
        let value = Config::parse_value(text, format)?;
        let config = Config::parse_as(text, format)?;
        Ok((config, crate::verify::key_warnings(&value)))
    }

    /// A JSON config (the tests' shorthand).
    pub fn parse(text: &str) -> Result<Config, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The typed config; a mistake is located where the parser can tell.
    pub fn parse_as(text: &str, format: Format) -> Result<Config, ParseError> {
        match format {
            Format::Json => serde_json::from_str(text).map_err(ParseError::json),
            Format::Toml => toml::from_str(text).map_err(|error| ParseError::toml(error, text)),
            Format::Yaml => serde_yaml_ng::from_str(text).map_err(ParseError::yaml),
        }
    }

    /// The file as plain data, whatever its language: what the key check walks, and what
    /// `verify-config` shows back.
    pub fn parse_value(text: &str, format: Format) -> Result<serde_json::Value, ParseError> {
        match format {
            Format::Json => serde_json::from_str(text).map_err(ParseError::json),
            Format::Toml => toml::from_str(text).map_err(|error| ParseError::toml(error, text)),
            Format::Yaml => serde_yaml_ng::from_str(text).map_err(ParseError::yaml),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_upstream_style_keys() {
        let config = Config::parse(
            r#"{
                "target": "pid/42",
                "feature": {
                    "env": {"include": "DB_*;API_KEY", "exclude": ["SECRET"], "override": {"MODE": "dev"}},
                    "fs": {"mode": "read"}
                },
                "agent": {"ttl": 30, "namespace": "default"}
            }"#,
        )
        .unwrap();
        assert_eq!(
            config.target.as_ref().and_then(TargetConfig::path),
            Some("pid/42")
        );
        let EnvFeature::Detailed(env) = &config.feature.env else {
            panic!("detailed env expected")
        };
        assert_eq!(
            env.include.as_ref().map(PatternList::joined).as_deref(),
            Some("DB_*;API_KEY")
        );
        assert_eq!(
            env.exclude.as_ref().map(PatternList::joined).as_deref(),
            Some("SECRET")
        );
        assert_eq!(env.overrides.get("MODE").map(String::as_str), Some("dev"));
        assert_eq!(config.agent.ttl, Some(30));
    }

    #[test]
    fn target_object_and_env_toggle() {
        let config = Config::parse(
            r#"{"target": {"path": "pid/7", "namespace": "x"}, "feature": {"env": false}}"#,
        )
        .unwrap();
        assert_eq!(
            config.target.as_ref().and_then(TargetConfig::path),
            Some("pid/7")
        );
        assert_eq!(config.feature.env, EnvFeature::Enabled(false));
    }

    #[test]
    fn fs_mode_alone_or_detailed() {
        let config = Config::parse(r#"{"feature": {"fs": "write"}}"#).unwrap();
        assert_eq!(config.feature.fs, FsFeature::Mode(FsModeName::Write));
        let config = Config::parse(
            r#"{"feature": {"fs": {"mode": "localwithoverrides", "read_only": ["/etc/app"], "local": "/etc/hosts"}}}"#,
        )
        .unwrap();
        let FsFeature::Detailed(fs) = &config.feature.fs else {
            panic!("detailed fs expected")
        };
        assert_eq!(fs.mode, Some(FsModeName::LocalWithOverrides));
        assert_eq!(
            fs.read_only.as_ref().map(PatternList::entries),
            Some(vec!["/etc/app".to_owned()])
        );
        assert_eq!(
            fs.local.as_ref().map(PatternList::entries),
            Some(vec!["/etc/hosts".to_owned()])
        );
        assert_eq!(fs.xattrs, None);
        let config = Config::parse(r#"{"feature": {"fs": {"xattrs": true}}}"#).unwrap();
        let FsFeature::Detailed(fs) = &config.feature.fs else {
            panic!("detailed fs expected")
        };
        assert_eq!(fs.xattrs, Some(true));
        assert!(Config::parse(r#"{"feature": {"fs": "sideways"}}"#).is_err());
    }

    #[test]
    fn outgoing_network_keys() {
        let config = Config::parse(
            r#"{"feature": {"network": {"outgoing": {"udp": false, "filter": {"local": ["tcp://:5432", "example.com"]}}}}}"#,
        )
        .unwrap();
        let OutgoingFeature::Detailed(outgoing) = &config.feature.network.outgoing else {
            panic!("detailed outgoing expected")
        };
        assert_eq!(outgoing.udp, Some(false));
        assert_eq!(
            outgoing
                .filter
                .as_ref()
                .and_then(|filter| filter.local.clone()),
            Some(vec!["tcp://:5432".to_owned(), "example.com".to_owned()])
        );
        let config = Config::parse(r#"{"feature": {"network": {"outgoing": false}}}"#).unwrap();
        assert_eq!(
            config.feature.network.outgoing,
            OutgoingFeature::Enabled(false)
        );
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(Config::parse("{}").unwrap(), Config::default());
    }

    #[test]
    fn bad_json_is_an_error() {
        assert!(Config::parse(r#"{"target": 5}"#).is_err());
        assert!(Config::parse("not json").is_err());
    }
}
