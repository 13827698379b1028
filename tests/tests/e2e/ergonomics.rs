//! What a user meets around the sessions themselves: shell completion (a `pid/` target offered
//! at `mirrord exec -t <TAB>`), `verify-config` on upstream, misspelt and broken files, the
//! version line, man pages, the install script, `--env-file`, `-q` and `NO_COLOR`.

use std::path::{Path, PathBuf};
use std::process::Command;

use libtest_mimic::Failed;
use mirrord_tests::command::{Run, SHORT};
use mirrord_tests::{Cluster, Output, Pty, Scene};

use super::{POD_VALUE, QUOTED_VALUE, RUN, env_map, exec, mirrord, standard_pod};

/// The repository, for `scripts/install`.
fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A shell that knows only what the test gives it: no rc files, `mirrord` first on PATH, a
/// HOME without a kubeconfig (so completion never looks for a cluster).
fn bash(scene: &Scene, script: &str) -> Result<Output, Failed> {
    let binary = mirrord_tests::mirrord_binary()?;
    let dir = binary
        .parent()
        .ok_or("the mirrord binary has no directory")?;
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = scene.command("bash");
    cmd.args(["--norc", "--noprofile", "-c", script])
        .env("PATH", path)
        .env("HOME", scene.temp_dir())
        .env_remove("KUBECONFIG");
    Ok(cmd.run(RUN)?)
}

/// What bash offers for the words of `line` (the last one is being completed), through the
/// function the script registered, as a TAB would call it.
fn complete(scene: &Scene, script: &Path, line: &str) -> Result<Vec<String>, Failed> {
    let quoted: Vec<String> = line.split(' ').map(|word| format!("'{word}'")).collect();
    let body = format!(
        "source '{}'\n\
         COMP_WORDS=({})\n\
         COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))\n\
         COMP_LINE='{line}'; COMP_POINT=${{#COMP_LINE}}; COMP_TYPE=9\n\
         _clap_complete_mirrord mirrord \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"\n\
         printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display(),
        quoted.join(" ")
    );
    let out = bash(scene, &body)?;
    ensure!(
        out.code == 0 && out.stderr.is_empty(),
        "completing `{line}`: {}",
        out.describe()
    );
    Ok(out.stdout.lines().map(str::to_owned).collect())
}

pub fn completion_scripts_load_and_offer_a_pid_target(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    for shell in ["bash", "zsh", "fish"] {
        let out = mirrord(scene, &["completions", shell])?;
        ensure!(
            out.code == 0 && out.stdout.contains("_MIRRORD_COMPLETE"),
            "mirrord completions {shell}: {}",
            out.describe()
        );
        std::fs::write(
            scene.temp_dir().join(format!("completion.{shell}")),
            &out.stdout,
        )?;
    }
    let script = scene.temp_dir().join("completion.bash");
    let out = bash(
        scene,
        &format!("source '{}' && complete -p mirrord", script.display()),
    )?;
    ensure!(
        out.code == 0 && out.stderr.is_empty() && out.stdout.contains("_clap_complete_mirrord"),
        "the bash script does not load cleanly: {}",
        out.describe()
    );

    let targets = complete(scene, &script, "mirrord exec -t ")?;
    ensure!(
        targets.contains(&pod.target()) && targets.contains(&"targetless".to_owned()),
        "`mirrord exec -t <TAB>` offers {targets:?}, not {}",
        pod.target()
    );
    let narrowed = complete(
        scene,
        &script,
        &format!("mirrord shell --target pid/{}", pod.pid()),
    )?;
    ensure!(
        narrowed == vec![pod.target()],
        "`mirrord shell --target pid/{}<TAB>` offers {narrowed:?}",
        pod.pid()
    );
    let flags = complete(scene, &script, "mirrord exec --env-f")?;
    ensure!(
        flags == vec!["--env-file"],
        "`mirrord exec --env-f<TAB>` offers {flags:?}"
    );
    let commands = complete(scene, &script, "mirrord verify")?;
    ensure!(
        commands == vec!["verify-config"],
        "`mirrord verify<TAB>` offers {commands:?}"
    );
    Ok(())
}

/// `verify-config` prints upstream's report: `type` first, the config, warnings or errors.
fn verify(scene: &Scene, name: &str, text: &str) -> Result<(Output, serde_json::Value), Failed> {
    let path = scene.temp_dir().join(name);
    std::fs::write(&path, text)?;
    let out = mirrord(scene, &["verify-config", &path.to_string_lossy()])?;
    ensure!(
        out.stdout.starts_with("{\n  \"type\": ") && out.stderr.is_empty(),
        "verify-config {name}: {}",
        out.describe()
    );
    let report = serde_json::from_str(&out.stdout)?;
    Ok((out, report))
}

fn strings(value: &serde_json::Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|item| item.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

pub fn verify_config_upstream_misspelt_and_broken_files(
    scene: &Scene,
    _cluster: &Cluster,
) -> Result<(), Failed> {
    // A file written for upstream mirrord, with keys this version does not implement.
    let upstream = r#"{
  "target": {"path": "deployment/web", "namespace": "shop"},
  "operator": false,
  "agent": {"log_level": "info", "ttl": 30},
  "feature": {
    "env": {"include": "DB_*;API_URL", "override": {"LOG_LEVEL": "debug"}},
    "fs": "read",
    "network": {
      "incoming": {"mode": "steal", "http_filter": {"header_filter": "^x-user: me$"}, "listen_ports": [[80, 8111]]},
      "outgoing": {"udp": true, "ignore_localhost": false}
    }
  }
}
"#;
    let (out, report) = verify(scene, "upstream.json", upstream)?;
    let warnings = strings(&report["warnings"]);
    ensure!(
        out.code == 0
            && report["type"] == "Success"
            && report["config"]["target"]["path"] == "deployment/web"
            && warnings.len() == 3
            && [
                "`operator`",
                "`agent.log_level`",
                "`feature.network.incoming.listen_ports`"
            ]
            .iter()
            .all(|key| warnings
                .iter()
                .any(|w| w.starts_with(key) && w.contains("ignored"))),
        "upstream file: {}",
        out.describe()
    );

    // TOML with two misspelt keys: each named, with the nearest known key.
    let misspelt =
        "target = \"pod/web-1\"\n[feature.envv]\ninclude = \"DB_*\"\n[agent]\nttll = 5\n";
    let (out, report) = verify(scene, "misspelt.toml", misspelt)?;
    let warnings = strings(&report["warnings"]);
    ensure!(
        out.code == 0
            && report["type"] == "Success"
            && warnings
                == vec![
                    "unknown key `agent.ttll` is ignored; did you mean `agent.ttl`?",
                    "unknown key `feature.envv` is ignored; did you mean `feature.env`?",
                ],
        "misspelt file: {}",
        out.describe()
    );

    // YAML that does not parse: the error says where.
    let broken = "target: pod/web-1\nfeature:\n  env: {include: [DB_*}\n";
    let (out, report) = verify(scene, "broken.yaml", broken)?;
    let errors = strings(&report["errors"]);
    ensure!(
        out.code == 1
            && report["type"] == "Fail"
            && errors.len() == 1
            && errors[0].contains("broken.yaml: line 3, column "),
        "broken file: {}",
        out.describe()
    );

    // A value of the wrong type in JSON, located too.
    let wrong = "{\n  \"agent\": {\"ttl\": \"long\"}\n}\n";
    let (out, report) = verify(scene, "wrong.json", wrong)?;
    let errors = strings(&report["errors"]);
    ensure!(
        out.code == 1 && errors.len() == 1 && errors[0].contains("line 2, column "),
        "wrong type: {}",
        out.describe()
    );
    Ok(())
}

pub fn version_and_man_pages(scene: &Scene, _cluster: &Cluster) -> Result<(), Failed> {
    let out = mirrord(scene, &["--version"])?;
    let line = out.stdout.trim_end();
    ensure!(
        out.code == 0
            && line.starts_with(&format!("mirrord {} (protocol ", env!("CARGO_PKG_VERSION")))
            && line.contains(", commit ")
            && !line.ends_with("commit )"),
        "--version: {}",
        out.describe()
    );
    let dir = scene.temp_dir().join("man1");
    let out = mirrord(scene, &["man-pages", &dir.to_string_lossy()])?;
    ensure!(out.code == 0, "man-pages: {}", out.describe());
    for (page, words) in [
        ("mirrord.1", &["mirrord-exec(1)", "verify-config"][..]),
        (
            "mirrord-exec.1",
            &["--target", "--env-file", "Examples:"][..],
        ),
    ] {
        let rendered = render_man_page(&dir.join(page))?;
        ensure!(
            words.iter().all(|word| rendered.stdout.contains(word)),
            "man -l {page} lacks one of {words:?}: {}",
            rendered.describe()
        );
    }
    Ok(())
}

fn render_man_page(page: &Path) -> Result<Output, Failed> {
    let mut man = Command::new("man");
    man.args(["-P", "cat", "-l"])
        .arg(page)
        .env("MANWIDTH", "100")
        .env("MAN_KEEP_FORMATTING", "0");
    let mut out = man.run(SHORT)?;
    ensure!(
        out.code == 0 && out.stderr.is_empty(),
        "man -l {}: {}",
        page.display(),
        out.describe()
    );
    // Without a terminal, man still marks bold and underline by overstriking (`x\bx`).
    let mut plain = String::new();
    for c in out.stdout.chars() {
        if c == '\u{8}' {
            plain.pop();
        } else {
            plain.push(c);
        }
    }
    out.stdout = plain;
    Ok(out)
}

pub fn install_script_into_a_temporary_prefix(
    scene: &Scene,
    _cluster: &Cluster,
) -> Result<(), Failed> {
    let prefix = scene.temp_dir().join("prefix");
    let release = mirrord_tests::mirrord_binary()?
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or("no target directory")?;
    let mut install = scene.command(repository().join("scripts/install"));
    install
        .args(["--no-build", "--prefix"])
        .arg(&prefix)
        .env("CARGO_TARGET_DIR", &release);
    let out = install.run(RUN)?;
    ensure!(out.code == 0, "scripts/install: {}", out.describe());
    for file in [
        "bin/mirrord",
        "bin/mirrord-agent",
        "share/man/man1/mirrord.1",
        "share/man/man1/mirrord-exec.1",
        "share/bash-completion/completions/mirrord",
        "share/zsh/site-functions/_mirrord",
        "share/fish/vendor_completions.d/mirrord.fish",
    ] {
        let path = prefix.join(file);
        ensure!(
            path.is_file()
                && out
                    .stdout
                    .contains(&format!("installed {}", path.display())),
            "{file} not installed or not reported: {}",
            out.describe()
        );
    }
    let version = scene
        .command(prefix.join("bin/mirrord"))
        .arg("--version")
        .run(SHORT)?;
    ensure!(
        version.code == 0 && version.stdout.starts_with("mirrord "),
        "installed mirrord: {}",
        version.describe()
    );
    let agent = scene
        .command(prefix.join("bin/mirrord-agent"))
        .arg("--help")
        .run(SHORT)?;
    ensure!(
        agent.code == 0,
        "installed mirrord-agent: {}",
        agent.describe()
    );
    let rendered = render_man_page(&prefix.join("share/man/man1/mirrord.1"))?;
    ensure!(
        rendered.stdout.contains("mirrord"),
        "the installed page: {}",
        rendered.describe()
    );
    let completion = prefix.join("share/bash-completion/completions/mirrord");
    let loaded = bash(scene, &format!("source '{}'", completion.display()))?;
    ensure!(
        loaded.code == 0 && loaded.stderr.is_empty(),
        "the installed bash completion: {}",
        loaded.describe()
    );
    Ok(())
}

pub fn exec_env_file_goes_over_the_pods_variables(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let file = scene.temp_dir().join("dev.env");
    std::fs::write(
        &file,
        "# a comment\nPOD_VAR=from-the-file\nFILE_ONLY=\"two words\"\nKEEP_ME=from-the-file\n",
    )?;
    let file = file.to_string_lossy().into_owned();
    let out = exec(
        scene,
        &pod,
        &["--env-file", &file, "--env", "KEEP_ME=from-the-flag"],
        &["env"],
    )?;
    let env = env_map(&out.stdout);
    ensure!(
        out.code == 0
            && env.get("POD_VAR").map(String::as_str) == Some("from-the-file")
            && env.get("FILE_ONLY").map(String::as_str) == Some("two words")
            && env.get("KEEP_ME").map(String::as_str) == Some("from-the-flag")
            && env.get("KEEP_TOO").map(String::as_str) == Some("kept-too"),
        "--env-file: {}",
        out.describe()
    );

    // An IDE's env file written by `mirrord env --format dotenv` reads back to the pod's exact
    // values, also through the config key.
    let dotenv = mirrord(scene, &["env", "-t", &pod.target(), "--format", "dotenv"])?;
    ensure!(dotenv.code == 0, "mirrord env: {}", dotenv.describe());
    let written = scene.temp_dir().join("pod.env");
    std::fs::write(&written, &dotenv.stdout)?;
    let config = scene.temp_dir().join("mirrord.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"feature": {{"env": {{"env_file": "{}"}}}}}}"#,
            written.display()
        ),
    )?;
    let out = mirrord(
        scene,
        &[
            "exec",
            "-t",
            "targetless",
            "-f",
            &config.to_string_lossy(),
            "--",
            "sh",
            "-c",
            "printf '%s|%s' \"$POD_VAR\" \"$POD_QUOTED\"",
        ],
    )?;
    ensure!(
        out.code == 0 && out.stdout == format!("{POD_VALUE}|{QUOTED_VALUE}"),
        "feature.env.env_file: {}",
        out.describe()
    );

    let out = exec(scene, &pod, &["--env-file", "/nonexistent.env"], &["true"])?;
    ensure!(
        out.code == 125
            && out.stderr.lines().count() == 1
            && out
                .stderr
                .starts_with("mirrord: cannot read the env file /nonexistent.env")
            && out.stderr.contains("check the path given to --env-file"),
        "a missing env file: {}",
        out.describe()
    );
    Ok(())
}

pub fn quiet_and_no_color(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    // A config with a misspelt key: a session warns about it, unless -q.
    let config = scene.temp_dir().join("mirrord.json");
    std::fs::write(&config, r#"{"feature": {"envv": false}}"#)?;
    let config = config.to_string_lossy().into_owned();
    let out = exec(scene, &pod, &["-f", &config], &["printenv", "POD_VAR"])?;
    ensure!(
        out.code == 0
            && out.stdout == format!("{POD_VALUE}\n")
            && out.stderr
                == "mirrord: config: unknown key `feature.envv` is ignored; did you mean `feature.env`?\n",
        "the warning, through a pipe and without colour: {}",
        out.describe()
    );
    let out = exec(
        scene,
        &pod,
        &["-q", "-f", &config],
        &["printenv", "POD_VAR"],
    )?;
    ensure!(
        out.code == 0 && out.stdout == format!("{POD_VALUE}\n") && out.stderr.is_empty(),
        "-q: {}",
        out.describe()
    );
    // Errors are printed under -q too.
    let out = mirrord(scene, &["-q", "exec", "-t", "pid/0", "--", "true"])?;
    ensure!(
        out.code == 125 && out.stderr.starts_with("mirrord: ") && out.stderr.lines().count() == 1,
        "-q with an error: {}",
        out.describe()
    );

    // On a terminal the prefix is coloured; NO_COLOR turns that off.
    let on_terminal = |no_color: Option<&str>| -> Result<String, Failed> {
        let mut cmd = scene.mirrord()?;
        cmd.args(["exec", "-f", &config, "-t", &pod.target(), "--", "true"])
            .env("TERM", "xterm");
        match no_color {
            Some(value) => cmd.env("NO_COLOR", value),
            None => cmd.env_remove("NO_COLOR"),
        };
        let mut pty = Pty::spawn(cmd)?;
        let code = pty.wait(RUN)?;
        ensure!(
            code == 0,
            "on a terminal: exit {code}: {}",
            pty.transcript()
        );
        Ok(pty.transcript())
    };
    let coloured = on_terminal(None)?;
    ensure!(
        coloured.contains("\x1b[1;33mmirrord:\x1b[0m config: unknown key"),
        "no colour on a terminal: {coloured:?}"
    );
    let plain = on_terminal(Some("1"))?;
    ensure!(
        !plain.contains('\x1b') && plain.contains("mirrord: config: unknown key"),
        "colour despite NO_COLOR: {plain:?}"
    );
    Ok(())
}

/// The IDE recipes of docs/cli.md, with the pod as target: the VS Code task's command writes the
/// env file its launch configuration reads, and the interpreter wrapper runs the IDE's program
/// in the pod's context.
pub fn ide_task_and_interpreter_wrapper(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let dir = scene.temp_dir().join("project");
    std::fs::create_dir_all(dir.join(".mirrord"))?;
    let task = format!(
        "mirrord env -q -t {} --format dotenv > .mirrord/pod.env",
        pod.target()
    );
    let out = bash(scene, &format!("cd '{}' && {task}", dir.display()))?;
    ensure!(
        out.code == 0 && out.stderr.is_empty(),
        "the task: {}",
        out.describe()
    );
    let written = std::fs::read_to_string(dir.join(".mirrord/pod.env"))?;
    ensure!(
        written
            .lines()
            .any(|line| line == format!("POD_VAR={POD_VALUE}")),
        "the env file: {written}"
    );
    let wrapper = dir.join(".mirrord/python");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec mirrord exec -q -t {} -- python3 \"$@\"\n",
            pod.target()
        ),
    )?;
    let out = bash(
        scene,
        &format!(
            "chmod +x '{0}' && '{0}' -c 'import os, socket; print(os.environ[\"POD_VAR\"], socket.gethostname())'",
            wrapper.display()
        ),
    )?;
    ensure!(
        out.code == 0
            && out.stdout == format!("{POD_VALUE} {}\n", pod.hostname())
            && out.stderr.is_empty(),
        "the interpreter wrapper: {}",
        out.describe()
    );
    Ok(())
}
