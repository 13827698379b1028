//! Parses what `-t/--target` (or the config's `target`) names. It only parses: whether the
//! target exists is the agent's to say.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A local process (or container): the agent runs locally and joins its namespaces.
    Pid(u32),
    /// No target: the agent serves its own namespaces.
    Targetless,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    #[error(
        "Kubernetes targets ({0}) are not supported by this version yet; use pid/PID, targetless, or --agent-addr"
    )]
    Kubernetes(String),
    #[error("invalid target `{0}`: expected pid/PID or targetless")]
    Invalid(String),
}

const KUBERNETES_KINDS: &[&str] = &[
    "pod",
    "deployment",
    "deploy",
    "statefulset",
    "job",
    "cronjob",
    "rollout",
];

impl std::str::FromStr for Target {
    type Err = TargetError;

    fn from_str(text: &str) -> Result<Self, TargetError> {
        if text == "targetless" {
            return Ok(Target::Targetless);
        }
        let (kind, rest) = text
            .split_once('/')
            .ok_or_else(|| TargetError::Invalid(text.into()))?;
        match kind {
            "pid" => match rest.parse::<u32>() {
                Ok(pid) if pid > 0 => Ok(Target::Pid(pid)),
                _ => Err(TargetError::Invalid(text.into())),
            },
            kind if KUBERNETES_KINDS.contains(&kind) => Err(TargetError::Kubernetes(text.into())),
            _ => Err(TargetError::Invalid(text.into())),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Pid(pid) => write!(f, "pid/{pid}"),
            Target::Targetless => f.write_str("targetless"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pid_and_targetless() {
        assert_eq!("pid/123".parse(), Ok(Target::Pid(123)));
        assert_eq!("targetless".parse(), Ok(Target::Targetless));
        assert_eq!(Target::Pid(9).to_string(), "pid/9");
    }

    #[test]
    fn rejects_the_rest_clearly() {
        assert_eq!(
            "pid/abc".parse::<Target>(),
            Err(TargetError::Invalid("pid/abc".into()))
        );
        assert_eq!(
            "pid/0".parse::<Target>(),
            Err(TargetError::Invalid("pid/0".into()))
        );
        assert_eq!(
            "web".parse::<Target>(),
            Err(TargetError::Invalid("web".into()))
        );
        assert!(matches!(
            "deployment/web".parse::<Target>(),
            Err(TargetError::Kubernetes(_))
        ));
        assert!(matches!(
            "pod/web/container/app".parse::<Target>(),
            Err(TargetError::Kubernetes(_))
        ));
    }
}
