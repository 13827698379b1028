//! Composes the launched process's environment from the local one and the target's, applying
//! the user's include/exclude patterns and overrides; it must never let a target variable that
//! would break local tools (PATH, HOME, the terminal, the display, ...) in unless the user
//! overrides it explicitly.
//!
//! Pure functions on name/value lists: no reading of the real environment here.

use std::collections::HashMap;

/// Names (wildcard patterns) never taken from the target: the launched process runs local
/// binaries, on the local terminal and display, as the local user, so the pod's values for these
/// would break it. An explicit override may still set them.
pub const PROTECTED: &[&str] = &[
    "PATH",
    "HOME",
    "SHELL",
    "TERM",
    "TERM_PROGRAM*",
    "TERMINFO",
    "TERMINFO_DIRS",
    "COLORTERM",
    "USER",
    "LOGNAME",
    "MAIL",
    "PWD",
    "OLDPWD",
    "SHLVL",
    "LANG",
    "LANGUAGE",
    "LC_*",
    "TMPDIR",
    "DISPLAY",
    "WAYLAND_DISPLAY",
    "XAUTHORITY",
    "XDG_*",
    "SSH_*",
    "DBUS_SESSION_BUS_ADDRESS",
    "HOSTNAME",
    "_",
    // The pod's loader settings point at libraries that do not exist locally.
    "LD_*",
    // Toolchain homes of the pod image break the local toolchains of the same name.
    "JAVA_HOME",
    "PYTHONHOME",
    "GOROOT",
    // Settings that make shells, the C library or language runtimes run or load code they
    // name: a pod's value could point at a file under $MIRRORD_REMOTE_ROOT, which the pod writes.
    "BASH_ENV",
    "ENV",
    "BASH_FUNC_*",
    "PROMPT_COMMAND",
    "PS4",
    "GCONV_PATH",
    "GLIBC_TUNABLES",
    "LOCPATH",
    "NLSPATH",
    "HOSTALIASES",
    "LESSOPEN",
    "LESSCLOSE",
    "PERL5OPT",
    "PYTHONSTARTUP",
    "NODE_OPTIONS",
    "JAVA_TOOL_OPTIONS",
    "_JAVA_OPTIONS",
    "JDK_JAVA_OPTIONS",
    "GIT_SSH",
    "GIT_SSH_COMMAND",
    "GIT_EXEC_PATH",
    "GIT_CONFIG_*",
    // Our own settings (MIRRORD_TARGET, MIRRORD_REMOTE_ROOT, ...) describe this session.
    "MIRRORD_*",
];

/// `;`-separated wildcard patterns as in upstream mirrord's `-s`/`-x` (`*` any run, `?` one
/// char), matched against the whole name, case-sensitive. Blank entries are ignored and
/// surrounding whitespace is trimmed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Patterns {
    patterns: Vec<Vec<char>>,
}

impl Patterns {
    pub fn parse(s: &str) -> Self {
        let patterns = s
            .split(';')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| p.chars().collect())
            .collect();
        Self { patterns }
    }

    pub fn matches(&self, name: &str) -> bool {
        let name: Vec<char> = name.chars().collect();
        self.patterns.iter().any(|p| wildcard_match(p, &name))
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether one pattern is exactly `name`, with no wildcard: the user named it on purpose.
    pub fn names(&self, name: &str) -> bool {
        let name: Vec<char> = name.chars().collect();
        self.patterns
            .iter()
            .any(|p| *p == name && !p.iter().any(|c| matches!(c, '*' | '?')))
    }
}

/// Iterative glob match with single-star backtracking: linear in practice, no recursion.
fn wildcard_match(pattern: &[char], name: &[char]) -> bool {
    let (mut p, mut n) = (0, 0);
    // Position of the last `*` in the pattern and the name position it currently absorbs up to.
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some('*') => {
                star = Some((p, n));
                p += 1;
            }
            Some('?') => {
                p += 1;
                n += 1;
            }
            Some(c) if *c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|c| *c == '*')
}

fn is_protected(name: &str) -> bool {
    let name: Vec<char> = name.chars().collect();
    PROTECTED
        .iter()
        .any(|p| wildcard_match(&p.chars().collect::<Vec<_>>(), &name))
}

/// What the user asked for from the target's environment.
#[derive(Debug, Clone, Default)]
pub struct EnvFilter {
    /// When set, only target names matching it are taken (an empty set takes none).
    pub include: Option<Patterns>,
    /// Target names matching it are never taken.
    pub exclude: Option<Patterns>,
    /// Applied last, in order; always win, even over [`PROTECTED`] names.
    pub overrides: Vec<(String, String)>,
}

/// An ordered name/value list where setting an existing name replaces its value in place.
struct OrderedEnv {
    vars: Vec<(String, String)>,
    index: HashMap<String, usize>,
}

impl OrderedEnv {
    fn new() -> Self {
        Self {
            vars: Vec::new(),
            index: HashMap::new(),
        }
    }

    fn set(&mut self, name: &str, value: &str) {
        match self.index.get(name) {
            Some(&i) => self.vars[i].1 = value.to_owned(),
            None => {
                self.index.insert(name.to_owned(), self.vars.len());
                self.vars.push((name.to_owned(), value.to_owned()));
            }
        }
    }
}

/// The target's variables a user asked for: `remote` minus [`PROTECTED`] (unless `include` names
/// one exactly); if `include` is set
/// only names matching it; minus names matching `exclude`; then `overrides` applied.
/// Order: remote order (a repeated name keeps its first position and its last value), then
/// new override names in override order.
pub fn remote_vars(remote: &[(String, String)], filter: &EnvFilter) -> Vec<(String, String)> {
    let mut out = OrderedEnv::new();
    for (name, value) in remote {
        let included = filter.include.as_ref().is_none_or(|p| p.matches(name));
        let excluded = filter.exclude.as_ref().is_some_and(|p| p.matches(name));
        // A protected name comes in only when an include names it exactly: `*` or `LD_*` are
        // not a decision to let the pod's loader settings take over local programs.
        let allowed = !is_protected(name) || filter.include.as_ref().is_some_and(|p| p.names(name));
        if included && !excluded && allowed {
            out.set(name, value);
        }
    }
    for (name, value) in &filter.overrides {
        out.set(name, value);
    }
    out.vars
}

/// The local environment overlaid with [`remote_vars`]: the remote value wins for a name set on
/// both sides. Order: local order, then names only the remote side has, in remote order.
pub fn compose(
    local: &[(String, String)],
    remote: &[(String, String)],
    filter: &EnvFilter,
) -> Vec<(String, String)> {
    let mut out = OrderedEnv::new();
    for (name, value) in local {
        out.set(name, value);
    }
    for (name, value) in remote_vars(remote, filter) {
        out.set(&name, &value);
    }
    out.vars
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    fn names(list: &[(String, String)]) -> Vec<&str> {
        list.iter().map(|(n, _)| n.as_str()).collect()
    }

    #[test]
    fn patterns_match_whole_name_with_wildcards() {
        let p = Patterns::parse("DB_*;?PI_KEY; EXACT ;;");
        assert!(!p.is_empty());
        assert!(p.matches("DB_HOST"));
        assert!(p.matches("DB_"));
        assert!(p.matches("API_KEY"));
        assert!(p.matches("EXACT"));
        assert!(!p.matches("XDB_HOST"), "anchored at the start");
        assert!(!p.matches("EXACTLY"), "anchored at the end");
        assert!(!p.matches("PI_KEY"), "? needs exactly one char");
        assert!(!p.matches("AAPI_KEY"));
        assert!(!p.matches("db_host"), "case-sensitive");
    }

    #[test]
    fn patterns_backtrack_over_several_stars() {
        let p = Patterns::parse("*_A*B_*");
        assert!(p.matches("X_AyyB_z"));
        assert!(p.matches("_AB_"));
        assert!(p.matches("Q_A_B_A_B_"));
        assert!(!p.matches("X_AyyB"));
        let all = Patterns::parse("*");
        assert!(all.matches(""));
        assert!(all.matches("ANY"));
        let q = Patterns::parse("a?c*");
        assert!(q.matches("abc"));
        assert!(q.matches("abcdef"));
        assert!(!q.matches("ac"));
    }

    #[test]
    fn empty_pattern_list_matches_nothing() {
        for s in ["", ";", " ; ; "] {
            let p = Patterns::parse(s);
            assert!(p.is_empty());
            assert!(!p.matches(""));
            assert!(!p.matches("A"));
        }
    }

    #[test]
    fn protected_names_are_never_taken_from_the_target() {
        let remote = vars(&[
            ("PATH", "/pod/bin"),
            ("HOME", "/root"),
            ("LC_ALL", "C"),
            ("XDG_RUNTIME_DIR", "/run/user/0"),
            ("SSH_AUTH_SOCK", "/tmp/x"),
            ("LD_PRELOAD", "/pod/lib.so"),
            ("MIRRORD_TARGET", "evil"),
            ("_", "/usr/bin/env"),
            ("DB_HOST", "db"),
        ]);
        let out = remote_vars(&remote, &EnvFilter::default());
        assert_eq!(out, vars(&[("DB_HOST", "db")]));
        // Nor does an include by wildcard.
        let filter = EnvFilter {
            include: Some(Patterns::parse("*;LD_*;MIRRORD_TAR?ET")),
            ..EnvFilter::default()
        };
        assert_eq!(remote_vars(&remote, &filter), vars(&[("DB_HOST", "db")]));
        // An include that names one exactly takes it, and only it.
        let filter = EnvFilter {
            include: Some(Patterns::parse("LD_PRELOAD; DB_*")),
            ..EnvFilter::default()
        };
        assert_eq!(
            remote_vars(&remote, &filter),
            vars(&[("LD_PRELOAD", "/pod/lib.so"), ("DB_HOST", "db")])
        );
    }

    #[test]
    fn protected_list_covers_the_documented_names() {
        for name in [
            "PATH",
            "HOME",
            "SHELL",
            "TERM",
            "USER",
            "LOGNAME",
            "PWD",
            "OLDPWD",
            "SHLVL",
            "LANG",
            "LC_CTYPE",
            "TMPDIR",
            "DISPLAY",
            "WAYLAND_DISPLAY",
            "XAUTHORITY",
            "XDG_CONFIG_HOME",
            "SSH_AUTH_SOCK",
            "SSH_CONNECTION",
            "DBUS_SESSION_BUS_ADDRESS",
            "HOSTNAME",
            "TERMINFO",
            "COLORTERM",
            "_",
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "BASH_ENV",
            "BASH_FUNC_ls%%",
            "NODE_OPTIONS",
            "GIT_CONFIG_COUNT",
        ] {
            assert!(is_protected(name), "{name} must be protected");
        }
        for name in ["PATHS", "KUBERNETES_SERVICE_HOST", "DB_HOST", "TERMS", "__"] {
            assert!(!is_protected(name), "{name} must not be protected");
        }
    }

    #[test]
    fn include_keeps_only_matching_names() {
        let remote = vars(&[("DB_HOST", "db"), ("API_KEY", "k"), ("DB_PORT", "5432")]);
        let filter = EnvFilter {
            include: Some(Patterns::parse("DB_*")),
            ..EnvFilter::default()
        };
        assert_eq!(
            remote_vars(&remote, &filter),
            vars(&[("DB_HOST", "db"), ("DB_PORT", "5432")])
        );
        let none = EnvFilter {
            include: Some(Patterns::parse("")),
            ..EnvFilter::default()
        };
        assert!(remote_vars(&remote, &none).is_empty());
    }

    #[test]
    fn exclude_removes_matching_names_even_when_included() {
        let remote = vars(&[("DB_HOST", "db"), ("DB_PASSWORD", "x"), ("API_KEY", "k")]);
        let filter = EnvFilter {
            include: Some(Patterns::parse("DB_*")),
            exclude: Some(Patterns::parse("*PASSWORD*")),
            ..EnvFilter::default()
        };
        assert_eq!(remote_vars(&remote, &filter), vars(&[("DB_HOST", "db")]));
        let only_exclude = EnvFilter {
            exclude: Some(Patterns::parse("API_?EY")),
            ..EnvFilter::default()
        };
        assert_eq!(
            names(&remote_vars(&remote, &only_exclude)),
            ["DB_HOST", "DB_PASSWORD"]
        );
    }

    #[test]
    fn overrides_win_over_everything_and_may_set_protected_names() {
        let remote = vars(&[("DB_HOST", "db"), ("PATH", "/pod/bin"), ("SECRET", "s")]);
        let filter = EnvFilter {
            include: Some(Patterns::parse("DB_*")),
            exclude: Some(Patterns::parse("SECRET")),
            overrides: vars(&[
                ("SECRET", "mine"),
                ("DB_HOST", "localhost"),
                ("PATH", "/opt/bin"),
                ("NEW", "1"),
            ]),
        };
        assert_eq!(
            remote_vars(&remote, &filter),
            vars(&[
                ("DB_HOST", "localhost"),
                ("SECRET", "mine"),
                ("PATH", "/opt/bin"),
                ("NEW", "1"),
            ])
        );
    }

    #[test]
    fn repeated_remote_name_keeps_first_position_and_last_value() {
        let remote = vars(&[("A", "1"), ("B", "2"), ("A", "3")]);
        assert_eq!(
            remote_vars(&remote, &EnvFilter::default()),
            vars(&[("A", "3"), ("B", "2")])
        );
    }

    #[test]
    fn compose_overlays_remote_on_local_in_stable_order() {
        let local = vars(&[
            ("PATH", "/usr/bin"),
            ("DB_HOST", "localhost"),
            ("HOME", "/home/me"),
            ("EDITOR", "vi"),
        ]);
        let remote = vars(&[
            ("KUBERNETES_SERVICE_HOST", "10.0.0.1"),
            ("HOME", "/root"),
            ("DB_HOST", "db.svc"),
            ("PATH", "/pod/bin"),
            ("APP_MODE", "prod"),
        ]);
        let out = compose(&local, &remote, &EnvFilter::default());
        assert_eq!(
            out,
            vars(&[
                ("PATH", "/usr/bin"),
                ("DB_HOST", "db.svc"),
                ("HOME", "/home/me"),
                ("EDITOR", "vi"),
                ("KUBERNETES_SERVICE_HOST", "10.0.0.1"),
                ("APP_MODE", "prod"),
            ])
        );
    }

    #[test]
    fn compose_applies_filters_and_overrides() {
        let local = vars(&[("PATH", "/usr/bin"), ("API_KEY", "local"), ("X", "1")]);
        let remote = vars(&[("API_KEY", "remote"), ("DB_HOST", "db"), ("X", "2")]);
        let filter = EnvFilter {
            include: None,
            exclude: Some(Patterns::parse("API_KEY")),
            overrides: vars(&[("PATH", "/opt/bin:/usr/bin"), ("Y", "y")]),
        };
        assert_eq!(
            compose(&local, &remote, &filter),
            vars(&[
                ("PATH", "/opt/bin:/usr/bin"),
                ("API_KEY", "local"),
                ("X", "2"),
                ("DB_HOST", "db"),
                ("Y", "y"),
            ])
        );
    }

    #[test]
    fn compose_without_remote_is_the_local_environment() {
        let local = vars(&[("B", "2"), ("A", "1")]);
        assert_eq!(compose(&local, &[], &EnvFilter::default()), local);
    }
}
