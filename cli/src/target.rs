//! Parses what `-t/--target` (or the config's `target`) names. It only parses: whether the
//! target exists is the agent's (local targets) or the cluster's (Kubernetes targets) to say.

use std::fmt;

use mirrord_kube::TargetPath;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A local process (or container): the agent runs locally and joins its namespaces.
    Pid(u32),
    /// No target: the agent serves its own namespaces — in the cluster when one is configured,
    /// else on this machine.
    Targetless,
    /// A workload in a cluster (`deployment/web`, `pod/web-1/container/app`, …).
    Kubernetes(TargetPath),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    #[error("invalid target `{0}`: expected pid/PID")]
    Pid(String),
    #[error("{0}; or pid/PID for a local process")]
    Kubernetes(mirrord_kube::target::TargetParseError),
}

impl std::str::FromStr for Target {
    type Err = TargetError;

    fn from_str(text: &str) -> Result<Self, TargetError> {
        if text == "targetless" {
            return Ok(Target::Targetless);
        }
        if let Some(pid) = text.strip_prefix("pid/") {
            return match pid.parse::<u32>() {
                Ok(pid) if pid > 0 => Ok(Target::Pid(pid)),
                _ => Err(TargetError::Pid(text.into())),
            };
        }
        text.parse::<TargetPath>()
            .map(Target::Kubernetes)
            .map_err(TargetError::Kubernetes)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Pid(pid) => write!(f, "pid/{pid}"),
            Target::Targetless => f.write_str("targetless"),
            Target::Kubernetes(path) => path.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pid_targetless_and_cluster_paths() {
        assert_eq!("pid/123".parse(), Ok(Target::Pid(123)));
        assert_eq!("targetless".parse(), Ok(Target::Targetless));
        assert_eq!(Target::Pid(9).to_string(), "pid/9");
        for (text, shown) in [
            ("deployment/web", "deployment/web"),
            ("deploy/web", "deployment/web"),
            ("pod/web-1/container/app", "pod/web-1/container/app"),
            ("service/api", "service/api"),
        ] {
            let target: Target = text.parse().unwrap();
            assert!(matches!(target, Target::Kubernetes(_)), "{text}");
            assert_eq!(target.to_string(), shown);
        }
    }

    #[test]
    fn rejects_the_rest_clearly() {
        assert_eq!(
            "pid/abc".parse::<Target>(),
            Err(TargetError::Pid("pid/abc".into()))
        );
        assert_eq!(
            "pid/0".parse::<Target>(),
            Err(TargetError::Pid("pid/0".into()))
        );
        let error = "web".parse::<Target>().unwrap_err().to_string();
        assert!(
            error.contains("deployment") && error.ends_with("or pid/PID for a local process"),
            "{error}"
        );
    }
}
