//! A provider's base URL, parsed once, and the request URIs built from it.
//!
//! - [`Endpoint`]: scheme, host and base path of an API, checked when the provider is
//!   built; [`Endpoint::uri`] then only formats `path?query` per request and parses
//!   that part alone (the host is never parsed again); [`Endpoint::host`] is the
//!   `Host` header of its requests, built once.
//! - [`InvalidEndpoint`]: why a base URL cannot be used.
//!
//! The base path is normalized the way a browser (and the `url` crate) would, so a
//! request goes to the same target it went to when `url::Url` built every URI.

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Uri};

/// Why a base URL cannot be used as an [`Endpoint`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEndpoint {
    #[error("{0}")]
    Parse(#[from] url::ParseError),
    #[error("must be an http:// or https:// URL")]
    Scheme,
    #[error("has no host")]
    NoHost,
    #[error("cannot be used as a request target ({0})")]
    Target(String),
}

/// An API base: where requests go and the path prefix every request target starts with.
#[derive(Debug, Clone)]
pub struct Endpoint {
    scheme: Scheme,
    authority: Authority,
    /// `Host` of every request: the authority (a port only when it is not the
    /// scheme's default, which `url` drops), as hyper-util would write it.
    host: HeaderValue,
    /// The normalized base path without a trailing `/` (empty for the root).
    path: String,
}

impl Endpoint {
    /// Parses `base` (an `http` or `https` URL). A query, fragment or user info in it
    /// is not used.
    pub fn parse(base: &str) -> Result<Self, InvalidEndpoint> {
        let url = url::Url::parse(base.trim())?;
        let scheme = match url.scheme() {
            "http" => Scheme::HTTP,
            "https" => Scheme::HTTPS,
            _ => return Err(InvalidEndpoint::Scheme),
        };
        let host = url.host_str().ok_or(InvalidEndpoint::NoHost)?;
        let authority = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        let authority =
            Authority::try_from(authority).map_err(|e| InvalidEndpoint::Target(e.to_string()))?;
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|e| InvalidEndpoint::Target(e.to_string()))?;
        let path = url.path().trim_end_matches('/').to_owned();
        let endpoint = Self {
            scheme,
            authority,
            host,
            path,
        };
        // Every character `url` leaves in a path is one `http` accepts; checked once
        // here so a request can never fail on it.
        endpoint
            .uri("/", &[])
            .map_err(|e| InvalidEndpoint::Target(e.to_string()))?;
        Ok(endpoint)
    }

    /// The URI of `path` (starting with `/`) under the base path, with `query` pairs
    /// form-urlencoded (`application/x-www-form-urlencoded`, spaces as `+`), so no
    /// value can change the path or add a parameter. The request target on the wire
    /// is exactly this URI's [`Uri::path_and_query`].
    pub fn uri(&self, path: &str, query: &[(&str, &str)]) -> Result<Uri, http::Error> {
        let mut target = String::with_capacity(self.path.len() + path.len() + 64);
        target.push_str(&self.path);
        target.push_str(path);
        if !query.is_empty() {
            target.push('?');
            let start = target.len();
            target = form_urlencoded::Serializer::for_suffix(target, start)
                .extend_pairs(query)
                .finish();
        }
        let path_and_query = PathAndQuery::try_from(target)?;
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path_and_query);
        Uri::from_parts(parts).map_err(Into::into)
    }

    /// The `Host` header of requests to this endpoint (a cheap clone). Set by the
    /// caller, the HTTP client need not format it again for every request.
    pub fn host(&self) -> HeaderValue {
        self.host.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The base path is kept (normalized, without a trailing slash), the query is
    /// encoded once, and the host and default port are written as `url` writes them.
    #[test]
    fn uris_under_a_base() {
        let e = Endpoint::parse("http://127.0.0.1:8080/api/mer/").unwrap();
        let u = e
            .uri("/payment/detail", &[("outTradeNo", "../a b&c=d#e")])
            .unwrap();
        assert_eq!(
            u.to_string(),
            "http://127.0.0.1:8080/api/mer/payment/detail?outTradeNo=..%2Fa+b%26c%3Dd%23e"
        );
        assert_eq!(
            e.uri("/conf/list/currency", &[]).unwrap().to_string(),
            "http://127.0.0.1:8080/api/mer/conf/list/currency"
        );
        let root = Endpoint::parse("HTTPS://Api.Example.COM:443").unwrap();
        assert_eq!(
            root.uri("/api/v3/x", &[("a", "1"), ("b", "é")])
                .unwrap()
                .to_string(),
            "https://api.example.com/api/v3/x?a=1&b=%C3%A9"
        );
        let odd = Endpoint::parse("http://h/a b/./c/../d").unwrap();
        assert_eq!(
            odd.uri("/e", &[])
                .unwrap()
                .path_and_query()
                .unwrap()
                .as_str(),
            "/a%20b/d/e"
        );
        let v6 = Endpoint::parse("http://[::1]:9/x").unwrap();
        assert_eq!(v6.uri("/y", &[]).unwrap().to_string(), "http://[::1]:9/x/y");
    }

    /// `host()` is the header hyper-util writes for a request without one: the
    /// URI's host, with the port unless it is the scheme's default.
    #[test]
    fn host_header_is_the_clients() {
        for (base, want) in [
            ("http://127.0.0.1:8080/api/mer", "127.0.0.1:8080"),
            ("http://h:80/x", "h"),
            ("https://Api.Example.COM:443", "api.example.com"),
            ("https://h:8443/", "h:8443"),
            ("http://user:pw@h:81/", "h:81"),
            ("http://[::1]:9/x", "[::1]:9"),
        ] {
            let e = Endpoint::parse(base).unwrap();
            assert_eq!(e.host(), want, "{base}");
            let uri = e.uri("/y", &[]).unwrap();
            let default = if uri.scheme() == Some(&Scheme::HTTPS) {
                443
            } else {
                80
            };
            let client = match uri.port_u16().filter(|&p| p != default) {
                Some(port) => format!("{}:{port}", uri.host().unwrap()),
                None => uri.host().unwrap().to_owned(),
            };
            assert_eq!(e.host(), client.as_str(), "{base}");
        }
    }

    /// Only absolute http(s) URLs with a host are endpoints.
    #[test]
    fn unusable_bases() {
        assert!(matches!(
            Endpoint::parse("ftp://h/x"),
            Err(InvalidEndpoint::Scheme)
        ));
        assert!(matches!(
            Endpoint::parse("/api/mer"),
            Err(InvalidEndpoint::Parse(_))
        ));
        assert!(Endpoint::parse("http://").is_err());
    }
}
