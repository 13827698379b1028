//! The config file parser, as a session reads `.mirrord/mirrord.json` (or `.toml`, `.yaml`):
//! the typed config and the key warnings (which walk the file against the config's schema).
//! The first input byte picks the language, the rest is the file.

use mirrord_cli::config::{Config, Format};

pub fn run(data: &[u8]) {
    let Some((&format, text)) = data.split_first() else {
        return;
    };
    let format = match format % 3 {
        0 => Format::Json,
        1 => Format::Toml,
        _ => Format::Yaml,
    };
    // A file that is not UTF-8 is refused when it is read, before any parser sees it.
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let _ = Config::from_text(text, format);
}
