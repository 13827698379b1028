//! A refused API request (HTTP 403) as one line a user can act on: who was refused which verb
//! on which resource where, and the `kubectl auth can-i` line that checks it. The apiserver's
//! message is parsed when it has the usual shape; otherwise what the caller asked for is
//! reported, so the line never loses the verb, resource or namespace.

use std::fmt;

/// One refused request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forbidden {
    /// The user the apiserver names (`restricted-user`, `system:serviceaccount:ns:sa`).
    pub user: Option<String>,
    pub verb: String,
    /// Resource, with `/subresource` when there is one (`pods/portforward`).
    pub resource: String,
    /// API group; empty for the core group.
    pub group: String,
    /// `None` at the cluster scope.
    pub namespace: Option<String>,
}

/// What the caller asked for, used when the message cannot be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    pub verb: &'a str,
    pub resource: &'a str,
    pub group: &'a str,
    pub namespace: Option<&'a str>,
}

/// The text between `before` and the next `"` after it.
fn quoted_after<'a>(message: &'a str, before: &str) -> Option<&'a str> {
    let start = message.find(before)? + before.len();
    let rest = message.get(start..)?;
    Some(&rest[..rest.find('"')?])
}

impl Forbidden {
    /// Parses `… is forbidden: User "U" cannot VERB resource "R" in API group "G" in the
    /// namespace "NS"` (or `… at the cluster scope`).
    pub fn parse(message: &str) -> Option<Forbidden> {
        let user = quoted_after(message, "User \"").map(str::to_owned);
        let after_cannot = &message[message.find(" cannot ")? + " cannot ".len()..];
        let verb = after_cannot.split_whitespace().next()?.to_owned();
        let resource = quoted_after(after_cannot, "resource \"")?.to_owned();
        let group = quoted_after(after_cannot, "API group \"")?.to_owned();
        let namespace = quoted_after(after_cannot, "the namespace \"").map(str::to_owned);
        Some(Forbidden {
            user,
            verb,
            resource,
            group,
            namespace,
        })
    }

    /// The refusal of `request`, as precise as the apiserver's message allows.
    pub fn new(request: Request<'_>, message: &str) -> Forbidden {
        Forbidden::parse(message).unwrap_or_else(|| Forbidden {
            user: None,
            verb: request.verb.to_owned(),
            resource: request.resource.to_owned(),
            group: request.group.to_owned(),
            namespace: request.namespace.map(str::to_owned),
        })
    }

    /// `jobs.batch`, `pods`: the resource as kubectl names it, without the subresource.
    fn qualified_resource(&self) -> String {
        let base = self.resource.split('/').next().unwrap_or_default();
        if self.group.is_empty() {
            base.to_owned()
        } else {
            format!("{base}.{}", self.group)
        }
    }

    /// The command that checks this permission.
    pub fn can_i(&self) -> String {
        let mut line = format!(
            "kubectl auth can-i {} {}",
            self.verb,
            self.qualified_resource()
        );
        if let Some((_, sub)) = self.resource.split_once('/') {
            line.push_str(&format!(" --subresource={sub}"));
        }
        if let Some(namespace) = &self.namespace {
            line.push_str(&format!(" -n {namespace}"));
        }
        line
    }
}

impl fmt::Display for Forbidden {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let who = self
            .user
            .as_deref()
            .map_or("you".to_owned(), |u| format!("user {u}"));
        write!(
            f,
            "forbidden: {who} may not {} {}",
            self.verb,
            self.qualified_resource()
        )?;
        if let Some((_, sub)) = self.resource.split_once('/') {
            write!(f, " ({sub})")?;
        }
        match &self.namespace {
            Some(namespace) => write!(f, " in namespace {namespace}")?,
            None => f.write_str(" at cluster scope")?,
        }
        write!(f, "; check with: {}", self.can_i())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_refusal_names_verb_resource_and_namespace() {
        let path = format!(
            "{}/tests/fixtures/forbidden-create-job.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let status: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(status["code"], 403);
        let forbidden = Forbidden::parse(status["message"].as_str().unwrap()).unwrap();
        assert_eq!(
            forbidden.to_string(),
            "forbidden: user restricted-user may not create jobs.batch in namespace default; check with: kubectl auth can-i create jobs.batch -n default"
        );
    }

    #[test]
    fn subresources_and_cluster_scope() {
        let message = "pods \"web-0\" is forbidden: User \"system:serviceaccount:ci:runner\" cannot create resource \"pods/portforward\" in API group \"\" in the namespace \"shop\"";
        let forbidden = Forbidden::parse(message).unwrap();
        assert_eq!(
            forbidden.to_string(),
            "forbidden: user system:serviceaccount:ci:runner may not create pods (portforward) in namespace shop; check with: kubectl auth can-i create pods --subresource=portforward -n shop"
        );
        let message = "nodes is forbidden: User \"bob\" cannot list resource \"nodes\" in API group \"\" at the cluster scope";
        assert_eq!(
            Forbidden::parse(message).unwrap().to_string(),
            "forbidden: user bob may not list nodes at cluster scope; check with: kubectl auth can-i list nodes"
        );
    }

    #[test]
    fn an_unusual_message_falls_back_to_the_request() {
        let request = Request {
            verb: "delete",
            resource: "jobs",
            group: "batch",
            namespace: Some("shop"),
        };
        let forbidden = Forbidden::new(request, "access denied by webhook");
        assert_eq!(
            forbidden.to_string(),
            "forbidden: you may not delete jobs.batch in namespace shop; check with: kubectl auth can-i delete jobs.batch -n shop"
        );
    }
}
