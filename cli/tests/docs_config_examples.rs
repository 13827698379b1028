//! The config examples in the documentation are what a user copies: each one (a fenced block
//! right after a `<!-- config example -->` line in README.md or docs/*.md) must be read by this
//! version without a warning or an error, and must validate against the committed JSON Schema
//! (docs/mirrord-schema.json) with Python's `jsonschema`, as an editor would check it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use mirrord_cli::config::{Config, Format};

const MARKER: &str = "<!-- config example -->";

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `(where, language, text)` of every marked example.
fn examples() -> Vec<(String, Format, String)> {
    let root = repository();
    let mut files = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    let mut found = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (index, line) in lines.iter().enumerate() {
            if line.trim() != MARKER {
                continue;
            }
            let fence = lines[index + 1].trim();
            let format = match fence {
                "```json" => Format::Json,
                "```toml" => Format::Toml,
                "```yaml" => Format::Yaml,
                other => panic!(
                    "{}:{}: a config example in {other}",
                    file.display(),
                    index + 2
                ),
            };
            let body: Vec<&str> = lines[index + 2..]
                .iter()
                .take_while(|line| line.trim() != "```")
                .copied()
                .collect();
            let place = format!("{}:{}", file.display(), index + 3);
            found.push((place, format, body.join("\n")));
        }
    }
    found
}

#[test]
fn documented_config_examples_are_valid_and_match_the_schema() {
    let examples = examples();
    // JSON, TOML and YAML are each shown at least once.
    for format in [Format::Json, Format::Toml, Format::Yaml] {
        assert!(
            examples.iter().any(|(_, f, _)| *f == format),
            "no {format:?} config example in the docs"
        );
    }
    let schema = repository().join("docs/mirrord-schema.json");
    for (place, format, text) in &examples {
        let value = Config::parse_value(text, *format).unwrap_or_else(|e| panic!("{place}: {e}"));
        let config = Config::parse_as(text, *format).unwrap_or_else(|e| panic!("{place}: {e}"));
        mirrord_cli::run::check_config(&config).unwrap_or_else(|e| panic!("{place}: {e}"));
        let warnings = mirrord_cli::verify::key_warnings(&value);
        assert!(warnings.is_empty(), "{place}: {warnings:?}");
        validate_with_python(&schema, &value, place);
    }
}

/// `python3 -m jsonschema`'s library: installed by scripts/install-deps (python3-jsonschema).
fn validate_with_python(schema: &Path, value: &serde_json::Value, place: &str) {
    let program = "import json, sys, jsonschema\n\
                   schema = json.load(open(sys.argv[1]))\n\
                   jsonschema.validators.validator_for(schema)(schema).validate(json.load(sys.stdin))\n";
    let mut child = Command::new("python3")
        .args(["-c", program])
        .arg(schema)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 is needed (scripts/install-deps)");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(value.to_string().as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{place} does not validate against docs/mirrord-schema.json (python3-jsonschema from scripts/install-deps): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The check itself catches what it must: a value of the wrong type fails the schema.
#[test]
fn the_schema_refuses_a_wrong_value() {
    let schema = repository().join("docs/mirrord-schema.json");
    let result = std::panic::catch_unwind(|| {
        validate_with_python(
            &schema,
            &serde_json::json!({"feature": {"fs": {"mode": "sideways"}}}),
            "test",
        )
    });
    assert!(result.is_err(), "an fs mode `sideways` passed the schema");
}
