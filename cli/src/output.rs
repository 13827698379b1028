//! What mirrord says about itself, always on stderr (stdout belongs to the command, `env`, `ls`
//! and `verify-config`): errors, warnings and progress. It must never colour text that is not a
//! terminal or when `NO_COLOR` is set (no-color.org), and under `-q` it says nothing but errors.

use std::fmt::Display;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once by `main` from `-q`.
static QUIET: AtomicBool = AtomicBool::new(false);

/// `-q`: from now on only errors are printed.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Whether progress and warnings are silenced.
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// Colour is for people: stderr is a terminal, and `NO_COLOR` is unset or empty.
pub fn colour() -> bool {
    colour_for(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    )
}

fn colour_for(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|value| value.is_empty())
}

/// `prefix` in bold `colour` (an SGR code) when colour is on.
fn painted(prefix: &str, code: &str) -> String {
    if colour() {
        format!("\x1b[1;{code}m{prefix}\x1b[0m")
    } else {
        prefix.to_owned()
    }
}

/// The one line of a failure: `mirrord: …` (red on a terminal). Printed even under `-q`.
pub fn error(line: impl Display) {
    eprintln!("{} {line}", painted("mirrord:", "31"));
}

/// Something the user should know that does not stop the session (yellow on a terminal).
pub fn warn(line: impl Display) {
    if !quiet() {
        eprintln!("{} {line}", painted("mirrord:", "33"));
    }
}

/// Progress and details (`-v`); plain text, silenced by `-q`.
pub fn note(line: impl Display) {
    if !quiet() {
        eprintln!("mirrord: {line}");
    }
}

/// Writes `text` to stdout; a reader that went away (`| head`) is not an error.
pub fn stdout(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour_for(true, None));
        assert!(colour_for(true, Some(OsStr::new(""))));
        assert!(!colour_for(true, Some(OsStr::new("1"))));
        assert!(!colour_for(false, None));
    }
}
