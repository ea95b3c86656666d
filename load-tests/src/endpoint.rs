//! The URL requests are POSTed to, derived from what the user typed: one endpoint
//! ([`Endpoint`]), or a server whose several endpoints the soak calls ([`BaseUrl`]).

use std::fmt;

use hyper::Uri;
use hyper::http::uri::Authority;

use crate::cli::FlagError;

/// Appended to a bare base URL such as `http://127.0.0.1:8000`.
pub const CHAT_COMPLETIONS_PATH: &str = "/v1/chat/completions";

/// An absolute `http://` URI of a chat completions endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    uri: Uri,
}

impl Endpoint {
    /// A base URL (no path, or just `/`) gets [`CHAT_COMPLETIONS_PATH`]; a URL with any
    /// other path is used as-is, so a proxy mounted under a prefix can be targeted.
    pub fn parse(raw: &str) -> Result<Self, FlagError> {
        let (uri, authority) = http_uri(raw)?;
        let has_path = uri.path_and_query().is_some_and(|pq| pq.as_str() != "/");
        if has_path {
            return Ok(Self { uri });
        }
        let uri = Uri::builder()
            .scheme("http")
            .authority(authority)
            .path_and_query(CHAT_COMPLETIONS_PATH)
            .build()
            .map_err(|e| FlagError::BadUrl(format!("{raw:?}: {e}")))?;
        Ok(Self { uri })
    }

    pub fn uri(&self) -> &Uri {
        &self.uri
    }
}

/// An absolute `http://HOST:PORT` URL without a path; requests go to paths under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    authority: Authority,
}

impl BaseUrl {
    pub fn parse(raw: &str) -> Result<Self, FlagError> {
        let (uri, authority) = http_uri(raw)?;
        if uri.path_and_query().is_some_and(|pq| pq.as_str() != "/") {
            return Err(FlagError::BadUrl(format!(
                "{raw:?}: give the base URL only (http://HOST:PORT); the paths are chosen per request"
            )));
        }
        Ok(Self { authority })
    }

    /// The URL of `path` (which starts with `/`) on this server.
    pub fn at(&self, path: &str) -> Result<Uri, hyper::http::Error> {
        Uri::builder()
            .scheme("http")
            .authority(self.authority.clone())
            .path_and_query(path)
            .build()
    }
}

impl fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}", self.authority)
    }
}

/// Parses an `http://` URL with a host; https is refused with the reason.
fn http_uri(raw: &str) -> Result<(Uri, Authority), FlagError> {
    let uri: Uri = raw
        .trim()
        .parse()
        .map_err(|e| FlagError::BadUrl(format!("{raw:?} is not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("http") => {}
        // No TLS connector is linked: the gateway and its backends are measured on
        // their plain listeners, and TLS cost would blur the overhead figures.
        Some("https") => {
            return Err(FlagError::BadUrl(format!(
                "{raw:?}: https is not supported, use the target's plain http:// listener"
            )));
        }
        _ => {
            return Err(FlagError::BadUrl(format!(
                "{raw:?}: expected http://HOST:PORT[/path]"
            )));
        }
    }
    let Some(authority) = uri.authority().cloned() else {
        return Err(FlagError::BadUrl(format!("{raw:?}: missing host")));
    };
    Ok((uri, authority))
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.uri.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(raw: &str) -> String {
        Endpoint::parse(raw).unwrap().to_string()
    }

    #[test]
    fn bare_base_gets_chat_completions_path() {
        assert_eq!(
            url("http://127.0.0.1:8000"),
            "http://127.0.0.1:8000/v1/chat/completions"
        );
    }

    #[test]
    fn trailing_slash_counts_as_bare_base() {
        assert_eq!(
            url("http://127.0.0.1:8000/"),
            "http://127.0.0.1:8000/v1/chat/completions"
        );
    }

    #[test]
    fn existing_path_and_query_are_kept_as_is() {
        assert_eq!(
            url("http://h:1/v1/chat/completions"),
            "http://h:1/v1/chat/completions"
        );
        assert_eq!(
            url("http://h:1/tenant/v1/chat?x=1"),
            "http://h:1/tenant/v1/chat?x=1"
        );
    }

    #[test]
    fn surrounding_whitespace_is_ignored() {
        assert_eq!(url(" http://h:1 "), "http://h:1/v1/chat/completions");
    }

    #[test]
    fn https_is_refused_with_a_reason() {
        let err = Endpoint::parse("https://h:1").unwrap_err();
        assert!(err.to_string().contains("https is not supported"), "{err}");
    }

    #[test]
    fn base_url_takes_no_path_and_builds_each_endpoint() {
        let base = BaseUrl::parse("http://127.0.0.1:8080/").unwrap();
        assert_eq!(
            base.at("/v1/embeddings").unwrap().to_string(),
            "http://127.0.0.1:8080/v1/embeddings"
        );
        assert_eq!(base.to_string(), "http://127.0.0.1:8080");
        let err = BaseUrl::parse("http://h:1/v1/chat/completions").unwrap_err();
        assert!(err.to_string().contains("base URL only"), "{err}");
        assert!(BaseUrl::parse("https://h:1").is_err());
    }

    #[test]
    fn missing_scheme_or_garbage_is_refused() {
        for bad in [
            "127.0.0.1:8000",
            "/v1/chat/completions",
            "http://",
            "not a url",
            "",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
