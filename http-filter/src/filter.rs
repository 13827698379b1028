//! Which requests a subscription takes: an [`HttpFilter`] from the wire compiled once into
//! regular expressions, then matched against each request's head. Pure: no I/O, and a request
//! is never changed by being looked at.
//!
//! Every pattern is case-insensitive and unanchored (`^`/`$` anchor it), as
//! [`mirrord_protocol::incoming::HttpFilter`] documents. A header pattern is tried against the
//! line `Name: value` of each header in turn, the name in lower case as HTTP/2 sends it (case
//! does not matter to a case-insensitive pattern, and a header may appear several times).

use http::{HeaderMap, Method, Request, Uri};
use mirrord_protocol::incoming::HttpFilter;

/// A compiled [`HttpFilter`].
#[derive(Debug, Clone)]
pub struct Filter(Node);

#[derive(Debug, Clone)]
enum Node {
    /// Bytes, not `str`: a header value may be any visible byte, and a non-UTF-8 one must still
    /// be matched rather than silently skipped.
    Header(regex::bytes::Regex),
    Path(regex::Regex),
    Method(regex::Regex),
    AllOf(Vec<Node>),
    AnyOf(Vec<Node>),
}

/// A pattern the `regex` crate refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("HTTP filter pattern {pattern:?} is not a valid regular expression: {reason}")]
pub struct FilterError {
    pub pattern: String,
    /// The `regex` crate's reason, on one line (its own message draws a caret under the
    /// pattern over several).
    pub reason: String,
}

impl Filter {
    pub fn compile(filter: &HttpFilter) -> Result<Filter, FilterError> {
        Node::compile(filter).map(Filter)
    }

    /// Whether the request goes to the session; its body is never looked at.
    pub fn matches<B>(&self, request: &Request<B>) -> bool {
        self.0
            .matches(request.method(), request.uri(), request.headers())
    }
}

impl Node {
    fn compile(filter: &HttpFilter) -> Result<Node, FilterError> {
        Ok(match filter {
            HttpFilter::Header(pattern) => Node::Header(
                regex::bytes::RegexBuilder::new(pattern)
                    .case_insensitive(true)
                    .build()
                    .map_err(|error| FilterError::new(pattern, &error))?,
            ),
            HttpFilter::Path(pattern) => Node::Path(text_regex(pattern)?),
            HttpFilter::Method(pattern) => Node::Method(text_regex(pattern)?),
            HttpFilter::AllOf(all) => {
                Node::AllOf(all.iter().map(Node::compile).collect::<Result<_, _>>()?)
            }
            HttpFilter::AnyOf(any) => {
                Node::AnyOf(any.iter().map(Node::compile).collect::<Result<_, _>>()?)
            }
        })
    }

    /// An empty `AllOf` matches everything and an empty `AnyOf` nothing, as `all`/`any` do.
    fn matches(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> bool {
        match self {
            Node::Header(regex) => {
                let mut line = Vec::new();
                headers.iter().any(|(name, value)| {
                    line.clear();
                    line.extend_from_slice(name.as_str().as_bytes());
                    line.extend_from_slice(b": ");
                    line.extend_from_slice(value.as_bytes());
                    regex.is_match(&line)
                })
            }
            // An authority-form target (`CONNECT host:port`) has no path: it is matched as
            // the empty string, so `^/` never takes a tunnel.
            Node::Path(regex) => regex.is_match(uri.path_and_query().map_or("", |p| p.as_str())),
            Node::Method(regex) => regex.is_match(method.as_str()),
            Node::AllOf(all) => all.iter().all(|node| node.matches(method, uri, headers)),
            Node::AnyOf(any) => any.iter().any(|node| node.matches(method, uri, headers)),
        }
    }
}

fn text_regex(pattern: &str) -> Result<regex::Regex, FilterError> {
    regex::RegexBuilder::new(pattern)
        .case_insensitive(true)
        .build()
        .map_err(|error| FilterError::new(pattern, &error))
}

impl FilterError {
    fn new(pattern: &str, error: &regex::Error) -> FilterError {
        let message = error.to_string();
        // A syntax error reads "regex parse error:\n    <pattern>\n    ^\nerror: <reason>".
        let reason = match message.lines().find_map(|l| l.strip_prefix("error: ")) {
            Some(reason) => reason.to_string(),
            None => message.split_whitespace().collect::<Vec<_>>().join(" "),
        };
        FilterError {
            pattern: pattern.to_string(),
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, uri: &str, headers: &[(&str, &[u8])]) -> Request<()> {
        let mut builder = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    fn compile(filter: HttpFilter) -> Filter {
        Filter::compile(&filter).unwrap()
    }

    fn header(p: &str) -> HttpFilter {
        HttpFilter::Header(p.into())
    }

    #[test]
    fn header_matches_the_name_value_line_case_insensitively() {
        let filter = compile(header("^x-user: me$"));
        assert!(filter.matches(&request("GET", "/", &[("X-User", b"me")])));
        assert!(filter.matches(&request("GET", "/", &[("x-user", b"ME")])));
        assert!(!filter.matches(&request("GET", "/", &[("X-User", b"meh")])));
        assert!(!filter.matches(&request("GET", "/", &[("X-Other", b"me")])));
        assert!(!filter.matches(&request("GET", "/", &[])));
    }

    #[test]
    fn header_is_unanchored_and_tries_every_value() {
        let filter = compile(header("user: m"));
        let mut req = request("GET", "/", &[("x-user", b"you")]);
        assert!(!filter.matches(&req));
        req.headers_mut().append("x-user", "me".parse().unwrap());
        assert!(filter.matches(&req));
    }

    #[test]
    fn header_value_need_not_be_utf8() {
        // Latin-1, as old clients send it: the UTF-8 part still matches.
        let filter = compile(header("^x-name: caf"));
        assert!(filter.matches(&request("GET", "/", &[("x-name", b"caf\xe9")])));
    }

    #[test]
    fn path_matches_path_and_query() {
        let filter = compile(HttpFilter::Path("^/api/.*\\?debug=1".into()));
        assert!(filter.matches(&request("GET", "/api/users?debug=1", &[])));
        assert!(filter.matches(&request("GET", "/API/x?DEBUG=1", &[])));
        assert!(!filter.matches(&request("GET", "/api/users", &[])));
        assert!(!filter.matches(&request("GET", "/v2/api/x?debug=1", &[])));
        // HTTP/2 and absolute-form requests carry the whole URI; only the path counts.
        assert!(filter.matches(&request("GET", "http://svc:80/api/a?debug=1", &[])));
        assert!(!compile(HttpFilter::Path("^/".into())).matches(&request(
            "CONNECT",
            "svc:443",
            &[]
        )));
    }

    #[test]
    fn method_matches_the_method() {
        let filter = compile(HttpFilter::Method("^(post|put)$".into()));
        assert!(filter.matches(&request("POST", "/", &[])));
        assert!(filter.matches(&request("PUT", "/", &[])));
        assert!(!filter.matches(&request("GET", "/", &[])));
        assert!(!filter.matches(&request("POSTX", "/", &[])));
    }

    #[test]
    fn all_of_and_any_of_combine() {
        let filter = compile(HttpFilter::AllOf(vec![
            header("^x-user: me$"),
            HttpFilter::AnyOf(vec![
                HttpFilter::Path("^/api".into()),
                HttpFilter::Method("^post$".into()),
            ]),
        ]));
        let me: &[(&str, &[u8])] = &[("x-user", b"me")];
        assert!(filter.matches(&request("GET", "/api/x", me)));
        assert!(filter.matches(&request("POST", "/other", me)));
        assert!(!filter.matches(&request("GET", "/other", me)));
        assert!(!filter.matches(&request("POST", "/api", &[])));
    }

    #[test]
    fn empty_all_of_matches_everything_and_empty_any_of_nothing() {
        let req = request("GET", "/", &[]);
        assert!(compile(HttpFilter::AllOf(vec![])).matches(&req));
        assert!(!compile(HttpFilter::AnyOf(vec![])).matches(&req));
    }

    #[test]
    fn a_bad_pattern_is_named_on_one_line() {
        let nested = HttpFilter::AnyOf(vec![
            HttpFilter::Path("^/ok".into()),
            HttpFilter::Method("(GET".into()),
        ]);
        let error = Filter::compile(&nested).unwrap_err();
        assert_eq!(error.pattern, "(GET");
        let line = error.to_string();
        assert!(!line.contains('\n'), "{line}");
        assert_eq!(
            line,
            "HTTP filter pattern \"(GET\" is not a valid regular expression: unclosed group"
        );
        let error = Filter::compile(&header("a{99999999}")).unwrap_err();
        assert!(!error.to_string().contains('\n'), "{error}");
    }
}
