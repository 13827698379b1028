//! Target paths as a user writes them (`deployment/web`, `pod/web-1/container/app`,
//! `targetless`): parsed once into a [`TargetPath`] and printed back in the same form; a path
//! that is not one of the known kinds is refused with the list of kinds, never guessed at.

use std::fmt;
use std::str::FromStr;

/// The kinds of object a target path can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Pod,
    Deployment,
    StatefulSet,
    ReplicaSet,
    Job,
    CronJob,
    Service,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Pod,
        Kind::Deployment,
        Kind::StatefulSet,
        Kind::ReplicaSet,
        Kind::Job,
        Kind::CronJob,
        Kind::Service,
    ];

    /// The word a path uses (and prints) for this kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Pod => "pod",
            Kind::Deployment => "deployment",
            Kind::StatefulSet => "statefulset",
            Kind::ReplicaSet => "replicaset",
            Kind::Job => "job",
            Kind::CronJob => "cronjob",
            Kind::Service => "service",
        }
    }

    /// The canonical word or one of kubectl's short names for it.
    fn from_word(word: &str) -> Option<Kind> {
        Some(match word {
            "pod" | "po" => Kind::Pod,
            "deployment" | "deploy" => Kind::Deployment,
            "statefulset" | "sts" => Kind::StatefulSet,
            "replicaset" | "rs" => Kind::ReplicaSet,
            "job" => Kind::Job,
            "cronjob" | "cj" => Kind::CronJob,
            "service" | "svc" => Kind::Service,
            _ => return None,
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a session runs against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPath {
    /// No pod: the agent runs on its own in the namespace and lends its network.
    Targetless,
    /// `KIND/NAME[/container/CONTAINER]`.
    Object {
        kind: Kind,
        name: String,
        container: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid target {path:?}: {problem}; expected targetless or KIND/NAME[/container/NAME] with KIND one of pod, deployment (deploy), statefulset, replicaset, job, cronjob, service"
)]
pub struct TargetParseError {
    pub path: String,
    pub problem: &'static str,
}

/// Object and container names are DNS labels or subdomains: lowercase letters, digits, `-`
/// and `.`, at most 253 characters.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

impl FromStr for TargetPath {
    type Err = TargetParseError;

    fn from_str(path: &str) -> Result<Self, Self::Err> {
        let fail = |problem| TargetParseError {
            path: path.to_owned(),
            problem,
        };
        if path == "targetless" {
            return Ok(TargetPath::Targetless);
        }
        let parts: Vec<&str> = path.split('/').collect();
        let (kind, name, container) = match parts.as_slice() {
            [kind, name] => (kind, name, None),
            [kind, name, "container", container] => (kind, name, Some(*container)),
            [_] => return Err(fail("no KIND/ before the name")),
            _ => return Err(fail("too many or misplaced '/'")),
        };
        let kind = Kind::from_word(kind).ok_or_else(|| fail("unknown kind"))?;
        if !valid_name(name) {
            return Err(fail("the name is not a Kubernetes object name"));
        }
        if container.is_some_and(|c| !valid_name(c)) {
            return Err(fail("the container name is not a Kubernetes name"));
        }
        Ok(TargetPath::Object {
            kind,
            name: (*name).to_owned(),
            container: container.map(str::to_owned),
        })
    }
}

impl fmt::Display for TargetPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetPath::Targetless => f.write_str("targetless"),
            TargetPath::Object {
                kind,
                name,
                container,
            } => {
                write!(f, "{kind}/{name}")?;
                match container {
                    Some(container) => write!(f, "/container/{container}"),
                    None => Ok(()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(path: &str) -> Result<TargetPath, TargetParseError> {
        path.parse()
    }

    #[test]
    fn every_kind_parses_and_prints_back() {
        for kind in Kind::ALL {
            for path in [
                format!("{kind}/web-1"),
                format!("{kind}/web.v2/container/app"),
            ] {
                assert_eq!(parse(&path).unwrap().to_string(), path);
            }
        }
        assert_eq!(parse("targetless"), Ok(TargetPath::Targetless));
        assert_eq!(TargetPath::Targetless.to_string(), "targetless");
    }

    #[test]
    fn short_names_print_as_the_full_kind() {
        for (short, full) in [
            ("deploy/web", "deployment/web"),
            ("sts/db", "statefulset/db"),
            ("rs/web-5d8f", "replicaset/web-5d8f"),
            ("svc/web", "service/web"),
            ("cj/nightly", "cronjob/nightly"),
            ("po/web-0/container/c", "pod/web-0/container/c"),
        ] {
            assert_eq!(parse(short).unwrap().to_string(), full);
        }
    }

    #[test]
    fn container_is_kept() {
        assert_eq!(
            parse("pod/web-0/container/sidecar"),
            Ok(TargetPath::Object {
                kind: Kind::Pod,
                name: "web-0".into(),
                container: Some("sidecar".into())
            })
        );
    }

    #[test]
    fn bad_paths_say_what_is_wrong_and_list_the_kinds() {
        for (path, problem) in [
            ("web", "no KIND/ before the name"),
            ("pods/web", "unknown kind"),
            ("daemonset/agent", "unknown kind"),
            ("pod/", "the name is not a Kubernetes object name"),
            ("pod/Web", "the name is not a Kubernetes object name"),
            (
                "pod/web/container/",
                "the container name is not a Kubernetes name",
            ),
            ("pod/web/sidecar/x", "too many or misplaced '/'"),
            ("pod/web/container", "too many or misplaced '/'"),
            ("", "no KIND/ before the name"),
        ] {
            let err = parse(path).unwrap_err();
            assert_eq!(err.problem, problem, "{path}");
            let line = err.to_string();
            assert!(!line.contains('\n'));
            assert!(line.contains("deployment (deploy), statefulset"), "{line}");
        }
    }
}
