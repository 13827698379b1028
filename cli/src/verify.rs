//! Checks a config file against what this version reads, and must never start anything: the
//! JSON Schema generated from the config types ([`schema`]), the key check every session runs
//! ([`key_warnings`]: unknown keys with the nearest known one, upstream keys ignored here), and
//! `mirrord verify-config`, which reports in upstream mirrord's shape.
//!
//! The key check walks the file's data against the generated schema, so a key added to the
//! config types is known here without a second list to keep in step.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::OnceLock;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::config::{Config, Format};

/// Key paths of upstream mirrord's schema, one a line (`#` lines are comments).
const UPSTREAM_KEYS: &str = include_str!("upstream_keys.txt");

/// Exit status of `verify-config` when the file is not valid.
pub const EXIT_INVALID: i32 = 1;

/// The JSON Schema of the config file, as committed in `docs/mirrord-schema.json`.
pub fn schema() -> Value {
    let mut schema = schemars::schema_for!(Config).to_value();
    if let Some(object) = schema.as_object_mut() {
        object.insert("title".into(), "mirrord (Rust) config file".into());
        object.insert(
            "description".into(),
            "The config file of mirrord (Rust), `.mirrord/mirrord.json` by default; key names \
             follow upstream mirrord's. Keys listed here are read; upstream keys not listed are \
             accepted and ignored with a warning. See docs/cli.md."
                .into(),
        );
    }
    schema
}

fn cached_schema() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(schema)
}

fn upstream_keys() -> &'static BTreeSet<&'static str> {
    static KEYS: OnceLock<BTreeSet<&'static str>> = OnceLock::new();
    KEYS.get_or_init(|| {
        UPSTREAM_KEYS
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .collect()
    })
}

/// One warning per key this version does not read: an upstream key it ignores, or an unknown
/// key with the nearest known key at the same place. `value` is the whole file as data.
pub fn key_warnings(value: &Value) -> Vec<String> {
    let root = cached_schema();
    let mut warnings = Vec::new();
    walk(root, &[root], value, "", "", &mut warnings);
    warnings
}

/// Follows a local `$ref` (`#/$defs/NAME`), as schemars writes them.
fn resolve<'a>(root: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(reference) => reference
            .strip_prefix("#/$defs/")
            .and_then(|name| root.get("$defs")?.get(name))
            .map_or(schema, |target| resolve(root, target)),
        None => schema,
    }
}

/// `schema` and every alternative it allows (`anyOf`, `oneOf`, `allOf`), references followed.
fn branches<'a>(root: &'a Value, schema: &'a Value, out: &mut Vec<&'a Value>) {
    let schema = resolve(root, schema);
    out.push(schema);
    for keyword in ["anyOf", "oneOf", "allOf"] {
        for sub in schema
            .get(keyword)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            branches(root, sub, out);
        }
    }
}

fn walk(
    root: &Value,
    schemas: &[&Value],
    value: &Value,
    path: &str,
    upstream_path: &str,
    warnings: &mut Vec<String>,
) {
    let mut all = Vec::new();
    for schema in schemas {
        branches(root, schema, &mut all);
    }
    match value {
        Value::Object(object) => walk_object(root, &all, object, path, upstream_path, warnings),
        Value::Array(items) => {
            let item_schemas: Vec<&Value> = all
                .iter()
                .filter_map(|schema| schema.get("items"))
                .collect();
            if item_schemas.is_empty() {
                return;
            }
            for (index, item) in items.iter().enumerate() {
                let item_path = format!("{path}[{index}]");
                walk(
                    root,
                    &item_schemas,
                    item,
                    &item_path,
                    upstream_path,
                    warnings,
                );
            }
        }
        _ => {}
    }
}

fn walk_object(
    root: &Value,
    all: &[&Value],
    object: &Map<String, Value>,
    path: &str,
    upstream_path: &str,
    warnings: &mut Vec<String>,
) {
    let mut known: BTreeMap<&str, Vec<&Value>> = BTreeMap::new();
    for schema in all {
        for (key, sub) in schema
            .get("properties")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            known.entry(key.as_str()).or_default().push(sub);
        }
    }
    // A map (`override`) or free-form data (`true`) takes any key.
    let open = all.iter().any(|schema| {
        schema.as_bool() == Some(true)
            || schema
                .get("additionalProperties")
                .is_some_and(|extra| extra.is_object() || extra.as_bool() == Some(true))
    });
    if known.is_empty() || open {
        return;
    }
    let join = |base: &str, key: &str| {
        if base.is_empty() {
            key.to_owned()
        } else {
            format!("{base}.{key}")
        }
    };
    for (key, item) in object {
        // An editor's pointer to this schema: `"$schema": "…/mirrord-schema.json"`.
        if path.is_empty() && key == "$schema" {
            continue;
        }
        let key_path = join(path, key);
        let key_upstream = join(upstream_path, key);
        if let Some(subs) = known.get(key.as_str()) {
            walk(root, subs, item, &key_path, &key_upstream, warnings);
        } else if upstream_keys().contains(key_upstream.as_str()) {
            warnings.push(format!(
                "`{key_path}` is an upstream mirrord key this version does not implement; it is ignored"
            ));
        } else {
            let nearest = known
                .keys()
                .min_by_key(|candidate| strsim::levenshtein(key, candidate))
                .map(|nearest| join(path, nearest))
                .unwrap_or_default();
            warnings.push(format!(
                "unknown key `{key_path}` is ignored; did you mean `{nearest}`?"
            ));
        }
    }
}

/// The report of `verify-config`, in upstream mirrord's shape (`type` first).
#[derive(Debug, Serialize)]
#[serde(tag = "type")]
pub enum Report {
    Success {
        config: Value,
        warnings: Vec<String>,
    },
    Fail {
        errors: Vec<String>,
    },
}

/// `mirrord verify-config [--resolved] FILE`: the report (upstream's shape) and the exit
/// status. Without `--resolved` the config shown is the file as read; with it, every key this
/// version reads, with the defaults it applies (`null`: decided at run time, by a flag, the
/// target or the cluster).
pub fn verify(path: &Path, resolved: bool) -> (Report, i32) {
    let fail = |errors: Vec<String>| (Report::Fail { errors }, EXIT_INVALID);
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) => return fail(vec![format!("cannot read {}: {error}", path.display())]),
    };
    let format = Format::of(path);
    let value = match Config::parse_value(&text, format) {
        Ok(value) => value,
        Err(error) => return fail(vec![format!("{}: {error}", path.display())]),
    };
    let warnings = key_warnings(&value);
    let config = match Config::parse_as(&text, format) {
        Ok(config) => config,
        Err(error) => {
            let mut errors = vec![format!("{}: {error}", path.display())];
            errors.extend(warnings);
            return fail(errors);
        }
    };
    if let Err(error) = crate::run::check_config(&config) {
        return fail(vec![format!(
            "{}: {}",
            path.display(),
            mirrord_link::report::one_line(&error)
        )]);
    }
    let shown = if resolved {
        serde_json::to_value(&config).unwrap_or(Value::Null)
    } else {
        value
    };
    (
        Report::Success {
            config: shown,
            warnings,
        },
        0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn warnings_of(json: &str) -> Vec<String> {
        key_warnings(&serde_json::from_str(json).unwrap())
    }

    #[test]
    fn known_keys_give_no_warning() {
        assert!(
            warnings_of(
                r#"{"$schema": "docs/mirrord-schema.json",
                    "target": {"path": "pod/a", "namespace": "x"}, "kube_context": "c",
                    "feature": {"env": {"include": "A", "override": {"ANY_NAME": "1"}},
                                "fs": "read",
                                "network": {"incoming": {"mode": "steal", "http_filter": {"all_of": [{"header": "x"}]}},
                                            "outgoing": {"filter": {"local": [":53"]}}, "dns": false}},
                    "agent": {"ttl": 3}}"#
            )
            .is_empty()
        );
    }

    #[test]
    fn an_unknown_key_is_named_with_the_nearest_known_one() {
        assert_eq!(
            warnings_of(r#"{"feature": {"network": {"incomng": "steal"}}, "targt": "pod/a"}"#),
            vec![
                "unknown key `feature.network.incomng` is ignored; did you mean `feature.network.incoming`?",
                "unknown key `targt` is ignored; did you mean `target`?",
            ]
        );
        assert_eq!(
            warnings_of(
                r#"{"feature": {"network": {"incoming": {"http_filter": {"any_of": [{"heder": "x"}]}}}}}"#
            ),
            vec![
                "unknown key `feature.network.incoming.http_filter.any_of[0].heder` is ignored; did you mean `feature.network.incoming.http_filter.any_of[0].header`?"
            ]
        );
    }

    #[test]
    fn upstream_keys_are_ignored_with_a_warning() {
        assert_eq!(
            warnings_of(
                r#"{"operator": false, "agent": {"log_level": "info"},
                    "feature": {"network": {"incoming": {"listen_ports": [[80, 8111]]}}}}"#
            ),
            vec![
                "`agent.log_level` is an upstream mirrord key this version does not implement; it is ignored",
                "`feature.network.incoming.listen_ports` is an upstream mirrord key this version does not implement; it is ignored",
                "`operator` is an upstream mirrord key this version does not implement; it is ignored",
            ]
        );
    }

    #[test]
    fn a_malformed_file_is_located() {
        let dir = std::env::temp_dir().join(format!("mirrord-verify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text, line, column) in [
            (
                "bad.json",
                "{\n  \"target\": \"pod/a\",\n  \"agent\" {}\n}\n",
                3,
                11,
            ),
            ("bad.toml", "target = \"pod/a\"\n[agent\nttl = 3\n", 2, 7),
            ("bad.yaml", "target: pod/a\nagent:\n  ttl: [3\n", 4, 1),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            let (report, code) = verify(&path, false);
            assert_eq!(code, EXIT_INVALID, "{name}: {report:?}");
            let Report::Fail { errors } = report else {
                panic!("{name}: Fail expected")
            };
            let error = &errors[0];
            assert!(
                error.contains(&format!("line {line}, column {column}: ")),
                "{name}: {error}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_three_languages_read_the_same_config() {
        let json = r#"{"target": "pod/a", "feature": {"env": {"exclude": ["X"]}, "network": {"incoming": "steal"}}}"#;
        let toml = "target = \"pod/a\"\n[feature.env]\nexclude = [\"X\"]\n[feature.network]\nincoming = \"steal\"\n";
        let yaml =
            "target: pod/a\nfeature:\n  env:\n    exclude: [X]\n  network:\n    incoming: steal\n";
        let expected = Config::parse(json).unwrap();
        assert_eq!(Config::parse_as(toml, Format::Toml).unwrap(), expected);
        assert_eq!(Config::parse_as(yaml, Format::Yaml).unwrap(), expected);
        assert_eq!(
            Config::parse_value(toml, Format::Toml).unwrap(),
            Config::parse_value(json, Format::Json).unwrap()
        );
    }

    /// The committed schema is the generated one; regenerate it with
    /// `MIRRORD_WRITE_SCHEMA=1 cargo test -p mirrord-cli schema_in_docs`.
    #[test]
    fn schema_in_docs_is_current() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/mirrord-schema.json");
        let generated = format!("{}\n", serde_json::to_string_pretty(&schema()).unwrap());
        if std::env::var_os("MIRRORD_WRITE_SCHEMA").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "docs/mirrord-schema.json is stale: run MIRRORD_WRITE_SCHEMA=1 cargo test -p mirrord-cli schema_in_docs"
        );
    }
}
