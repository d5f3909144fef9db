//! The HTTP client under [`super::Transport`]: hyper-util's pooled client over a
//! connector for plain TCP, TLS, and the proxies the environment names.
//!
//! - [`Request`]: one request to send (method, URI, headers, body).
//! - [`HttpClient`]: the keep-alive pool; adds `User-Agent`, `Accept` and proxy
//!   credentials to every request.
//! - [`Connector`]: opens a connection to a destination, directly or through a proxy.
//! - [`Stream`]: the connection it opens.
//! - [`BuildError`]: why the client could not be built.
//! - [`ClientOptions`]: what `[fetch]` says about connecting: [`ExtraRoots`] (root
//!   certificates trusted besides the webpki roots, `fetch.ca_file`) and HTTP/2 prior
//!   knowledge (`fetch.http2_prior_knowledge`).
//!
//! TLS is rustls (ring) with the webpki roots (and any [`ExtraRoots`]),
//! certificates always verified;
//! http/1.1, or HTTP/2 when an https server picks it through ALPN. With prior
//! knowledge every connection speaks HTTP/2 from its first byte (h2c on plain http;
//! only `h2` offered through ALPN), so concurrent requests share one connection and
//! its system calls. Redirects are not followed (a 3xx is the provider's answer).
//!
//! Proxies come from `HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY` and `NO_PROXY` (or their
//! lower-case names), read once when the client is built, with curl's rules. An
//! `http://` request through a proxy is sent to the proxy in absolute form (with
//! `Proxy-Authorization` when the proxy URL has user info); an `https://` request goes
//! through a `CONNECT` tunnel, TLS end to end.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, HeaderMap, HeaderName, HeaderValue, PROXY_AUTHORIZATION, USER_AGENT};
use http::uri::Scheme;
use http::{Method, Uri};
use http_body_util::Full;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::net::TcpStream;

/// `User-Agent` of every request.
pub const USER_AGENT_VALUE: &str = concat!("paysync/", env!("CARGO_PKG_VERSION"));
/// Idle keep-alive connections kept per host (above any sane `fetch.concurrency`).
pub const POOL_MAX_IDLE_PER_HOST: usize = 256;
/// How long an idle pooled connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// TCP keepalive: first probe after this long idle, then every this long, 3 probes.
const TCP_KEEPALIVE: Duration = Duration::from_secs(15);
/// Unacknowledged data older than this drops the connection (Linux `TCP_USER_TIMEOUT`).
#[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);
/// Variables whose presence means a proxy may be in use (`NO_PROXY` alone means none).
const PROXY_VARS: [&str; 6] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
];

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why the HTTP client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up TLS: {0}")]
pub struct BuildError(#[from] rustls::Error);

/// Root certificates trusted besides the webpki (Mozilla) roots: a private CA, for
/// a provider deployed on premises or a TLS-inspecting proxy. Cheap to clone.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ExtraRoots(Arc<[CertificateDer<'static>]>);

impl ExtraRoots {
    /// The certificates of the `CERTIFICATE` sections of a PEM file (other
    /// sections are skipped). There must be at least one, and each must be usable
    /// as a trust anchor.
    pub fn from_pem(pem: &[u8]) -> Result<Self, String> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("is not a PEM file ({e})"))?;
        if certs.is_empty() {
            return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into());
        }
        let mut store = rustls::RootCertStore::empty();
        for (i, cert) in certs.iter().enumerate() {
            store.add(cert.clone()).map_err(|e| {
                format!(
                    "certificate {} of {} is not usable: {e}",
                    i + 1,
                    certs.len()
                )
            })?;
        }
        Ok(Self(certs.into()))
    }

    /// How many certificates there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// How the client connects: whom it trusts and which HTTP it speaks (`[fetch]`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientOptions {
    /// Root certificates trusted besides the webpki roots (`fetch.ca_file`).
    pub extra_roots: ExtraRoots,
    /// Speak HTTP/2 on every connection without asking first
    /// (`fetch.http2_prior_knowledge`): h2c for http, and only `h2` offered through
    /// ALPN for https (a server that cannot speak it fails the handshake).
    pub http2_prior_knowledge: bool,
}

impl ClientOptions {
    /// The protocols offered through ALPN on TLS connections to the destination.
    fn alpn(&self) -> &'static [&'static [u8]] {
        if self.http2_prior_knowledge {
            &[b"h2"]
        } else {
            &[b"h2", b"http/1.1"]
        }
    }

    /// The protocols offered through ALPN on TLS connections to an `https://` proxy.
    /// Without prior knowledge only http/1.1: requests to a proxy are written in
    /// absolute form, which HTTP/2 has no use for.
    fn proxy_alpn(&self) -> &'static [&'static [u8]] {
        if self.http2_prior_knowledge {
            &[b"h2"]
        } else {
            &[b"http/1.1"]
        }
    }
}

impl std::fmt::Debug for ExtraRoots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ExtraRoots({} certificates)", self.0.len())
    }
}

/// One HTTP request: method, absolute URI, headers and body (empty for a GET). No
/// `Debug`: headers and body can hold credentials.
pub struct Request(http::Request<Full<Bytes>>);

impl Request {
    pub fn new(method: Method, uri: Uri, body: Bytes) -> Self {
        let mut request = http::Request::new(Full::new(body));
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        // Room for what providers and the client add, allocated once.
        request.headers_mut().reserve(8);
        Self(request)
    }

    pub fn get(uri: Uri) -> Self {
        Self::new(Method::GET, uri, Bytes::new())
    }

    pub fn post(uri: Uri, body: impl Into<Bytes>) -> Self {
        Self::new(Method::POST, uri, body.into())
    }

    /// Adds a header (kept alongside any earlier value of the same name).
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.0.headers_mut().append(name, value);
        self
    }

    pub fn method(&self) -> &Method {
        self.0.method()
    }

    pub fn uri(&self) -> &Uri {
        self.0.uri()
    }

    pub fn headers(&self) -> &HeaderMap {
        self.0.headers()
    }
}

/// The pooled HTTP client. Cheap to clone (clones share the pool).
#[derive(Clone)]
pub struct HttpClient {
    client: Client<Connector, Full<Bytes>>,
    /// The environment's proxies, if it names any (also needed per request, for
    /// `Proxy-Authorization` on plain-http requests sent through a proxy).
    proxies: Option<Arc<Matcher>>,
    /// Whether every connection speaks HTTP/2 without asking.
    http2_prior_knowledge: bool,
}

impl HttpClient {
    /// A client using the proxies the environment names, if any, set up as
    /// `options` say.
    pub fn new(options: &ClientOptions) -> Result<Self, BuildError> {
        let proxies = PROXY_VARS
            .iter()
            .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))
            .then(Matcher::from_env);
        if let Some(m) = &proxies {
            // Matcher's Debug leaves out proxy credentials.
            tracing::debug!(proxies = ?m, "using proxies from the environment");
        }
        Self::with_proxies(proxies, options)
    }

    /// A client using `proxies` (none: every connection is direct), set up as
    /// `options` say.
    pub fn with_proxies(
        proxies: Option<Matcher>,
        options: &ClientOptions,
    ) -> Result<Self, BuildError> {
        let proxies = proxies.map(Arc::new);
        let roots = &options.extra_roots;
        let connector = Connector {
            direct: HttpsConnector::from((tcp(), tls_config(options.alpn(), roots)?)),
            to_proxy: HttpsConnector::from((tcp(), tls_config(options.proxy_alpn(), roots)?)),
            tunneled: Arc::new(tls_config(options.alpn(), roots)?),
            proxies: proxies.clone(),
        };
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            .http2_only(options.http2_prior_knowledge)
            .build(connector);
        Ok(Self {
            client,
            proxies,
            http2_prior_knowledge: options.http2_prior_knowledge,
        })
    }

    /// Whether every connection speaks HTTP/2 without asking
    /// (`fetch.http2_prior_knowledge`).
    pub fn http2_prior_knowledge(&self) -> bool {
        self.http2_prior_knowledge
    }

    /// Sends `request` on a pooled connection (or a new one) and resolves with the
    /// response head; the body is read from the response.
    pub fn send(&self, request: Request) -> ResponseFuture {
        let mut request = request.0;
        let headers = request.headers_mut();
        headers
            .entry(USER_AGENT)
            .or_insert(HeaderValue::from_static(USER_AGENT_VALUE));
        headers
            .entry(ACCEPT)
            .or_insert(HeaderValue::from_static("*/*"));
        if let Some(auth) = self.proxy_auth(request.uri()) {
            request.headers_mut().insert(PROXY_AUTHORIZATION, auth);
        }
        self.client.request(request)
    }

    /// `Proxy-Authorization` for a plain-http request that goes through a proxy with
    /// credentials. (An https request sends them in its `CONNECT` instead.)
    fn proxy_auth(&self, uri: &Uri) -> Option<HeaderValue> {
        if uri.scheme() != Some(&Scheme::HTTP) {
            return None;
        }
        self.proxies.as_ref()?.intercept(uri)?.basic_auth().cloned()
    }
}

/// A TCP connector set up as reqwest set its own: `TCP_NODELAY`, keepalive probes,
/// and (on Linux) a user timeout, so a dead peer is noticed.
fn tcp() -> HttpConnector {
    let mut http = HttpConnector::new();
    // The scheme is checked by the TLS layer above.
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_keepalive(Some(TCP_KEEPALIVE));
    http.set_keepalive_interval(Some(TCP_KEEPALIVE));
    http.set_keepalive_retries(Some(3));
    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    http.set_tcp_user_timeout(Some(TCP_USER_TIMEOUT));
    http
}

/// rustls with ring, TLS 1.2 and 1.3, the webpki roots and `extra`, offering `alpn`.
fn tls_config(alpn: &[&[u8]], extra: &ExtraRoots) -> Result<rustls::ClientConfig, BuildError> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for cert in extra.0.iter() {
        roots.add(cert.clone())?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Opens connections for the pool: per destination, directly (TCP, then TLS for
/// https) or through the proxy the environment names for it.
#[derive(Clone)]
pub struct Connector {
    /// Direct connections; TLS for https, offering [`ClientOptions::alpn`].
    direct: HttpsConnector<HttpConnector>,
    /// Connections to a proxy (TLS for an `https://` proxy, offering
    /// [`ClientOptions::proxy_alpn`]).
    to_proxy: HttpsConnector<HttpConnector>,
    /// TLS to the destination inside a `CONNECT` tunnel.
    tunneled: Arc<rustls::ClientConfig>,
    proxies: Option<Arc<Matcher>>,
}

type Connecting = Pin<Box<dyn Future<Output = Result<Stream, BoxError>> + Send>>;

impl tower_service::Service<Uri> for Connector {
    type Response = Stream;
    type Error = BoxError;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // The TCP connector is always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Connecting {
        let Some(proxy) = self.proxies.as_ref().and_then(|m| m.intercept(&dst)) else {
            let connecting = self.direct.call(dst);
            return Box::pin(async move { Ok(Stream::Direct(connecting.await?)) });
        };
        if !matches!(proxy.uri().scheme_str(), Some("http" | "https")) {
            // SOCKS URLs are understood by the matcher, but not spoken here.
            return Box::pin(async {
                Err("only http:// and https:// proxies are supported".into())
            });
        }
        if dst.scheme() == Some(&Scheme::HTTPS) {
            let mut tunnel = Tunnel::new(proxy.uri().clone(), self.to_proxy.clone());
            if let Some(auth) = proxy.basic_auth() {
                tunnel = tunnel.with_auth(auth.clone());
            }
            let connecting = HttpsConnector::from((tunnel, Arc::clone(&self.tunneled))).call(dst);
            Box::pin(async move { Ok(Stream::Tunneled(Box::new(connecting.await?))) })
        } else {
            let connecting = self.to_proxy.call(proxy.uri().clone());
            Box::pin(async move { Ok(Stream::Proxied(connecting.await?)) })
        }
    }
}

/// TCP, or TLS over TCP.
type Plain = MaybeHttpsStream<TokioIo<TcpStream>>;

/// A connection [`Connector`] opened.
pub enum Stream {
    /// To the destination itself.
    Direct(Plain),
    /// To a proxy that is sent plain-http requests in absolute form.
    Proxied(Plain),
    /// To the destination through a `CONNECT` tunnel (TLS inside it for https).
    Tunneled(Box<MaybeHttpsStream<Plain>>),
}

/// Runs `$body` with `$s` bound to the inner stream, whichever variant.
macro_rules! with_inner {
    ($stream:expr, $s:ident => $body:expr) => {
        match $stream {
            Stream::Direct($s) | Stream::Proxied($s) => $body,
            Stream::Tunneled($s) => {
                let $s = &mut **$s;
                $body
            }
        }
    };
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        match self {
            Stream::Direct(s) => lean(s.connected()),
            // Makes the client write absolute-form request targets.
            Stream::Proxied(s) => lean(s.connected()).proxy(true),
            Stream::Tunneled(s) => lean(s.connected()),
        }
    }
}

/// What the pool needs to know of a connection: whether ALPN chose HTTP/2, and
/// whether it goes to a proxy. Not the "extra" hyper-util's TCP connector attaches
/// (the socket addresses, which nothing here reads): the client would copy it into
/// every response's extensions, a map and a box per request.
fn lean(c: Connected) -> Connected {
    let lean = Connected::new().proxy(c.is_proxied());
    if c.is_negotiated_h2() {
        lean.negotiated_h2()
    } else {
        lean
    }
}

impl Read for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        with_inner!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
    }
}

impl Write for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        with_inner!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        with_inner!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        with_inner!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Direct(s) | Stream::Proxied(s) => s.is_write_vectored(),
            Stream::Tunneled(s) => s.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        with_inner!(self.get_mut(), s => Pin::new(s).poll_write_vectored(cx, bufs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::sync::Mutex;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    /// The error and its sources, as the transport writes them.
    fn chain(e: &(dyn std::error::Error + 'static)) -> String {
        let mut msg = e.to_string();
        let mut src = e.source();
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        msg
    }

    /// Reads one request head (up to the blank line), lower-casing header names.
    async fn read_head(reader: &mut BufReader<tokio::net::TcpStream>) -> String {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).await.unwrap() == 0 || line == "\r\n" {
                return head;
            }
            match line.split_once(':') {
                Some((name, value)) if !head.is_empty() => {
                    head.push_str(&format!("{}:{value}", name.to_ascii_lowercase()));
                }
                _ => head.push_str(&line),
            }
        }
    }

    /// A server that records each request head and answers `200 ok`: an origin
    /// server, or an http proxy that never forwards.
    async fn recording_server() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&heads);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let seen = Arc::clone(&seen);
                tokio::spawn(async move {
                    let mut reader = BufReader::new(tcp);
                    loop {
                        let head = read_head(&mut reader).await;
                        if head.is_empty() {
                            return;
                        }
                        seen.lock().unwrap().push(head);
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if reader.get_mut().write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, heads)
    }

    async fn body_of(client: &HttpClient, request: Request) -> Result<String, String> {
        use http_body_util::BodyExt;
        let resp = client.send(request).await.map_err(|e| chain(&e))?;
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// A connection keeps its protocol and proxy facts, but not the connector's
    /// socket addresses: responses carry no copy of them.
    #[tokio::test]
    async fn connections_are_described_without_extras() {
        #[derive(Clone)]
        struct Extra;
        for (h2, proxied) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut c = Connected::new().proxy(proxied).extra(Extra);
            if h2 {
                c = c.negotiated_h2();
            }
            let c = lean(c);
            assert_eq!((c.is_negotiated_h2(), c.is_proxied()), (h2, proxied));
            let mut extensions = http::Extensions::new();
            c.get_extras(&mut extensions);
            assert!(extensions.is_empty());
        }
        let (addr, _) = recording_server().await;
        let client = HttpClient::with_proxies(None, &ClientOptions::default()).unwrap();
        let uri: Uri = format!("http://{addr}/x").parse().unwrap();
        let resp = client.send(Request::get(uri)).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(
            resp.extensions()
                .get::<hyper_util::client::legacy::connect::HttpInfo>()
                .is_none()
        );
    }

    /// A request's own `Host` (what providers set from their endpoint) is sent
    /// once, as it is; without one the client writes the same value itself.
    #[tokio::test]
    async fn host_is_sent_once() {
        let (addr, heads) = recording_server().await;
        let client = HttpClient::with_proxies(None, &ClientOptions::default()).unwrap();
        let endpoint = crate::fetch::Endpoint::parse(&format!("http://{addr}/api")).unwrap();
        let uri = endpoint.uri("/x", &[]).unwrap();
        let with_host = Request::get(uri.clone()).header(http::header::HOST, endpoint.host());
        assert_eq!(body_of(&client, with_host).await.unwrap(), "ok");
        assert_eq!(body_of(&client, Request::get(uri)).await.unwrap(), "ok");
        let heads = heads.lock().unwrap().clone();
        let want = format!("host: {addr}\r\n");
        for head in &heads {
            assert_eq!(head.matches("host: ").count(), 1, "{head}");
            assert!(head.contains(&want), "{head}");
        }
    }

    /// Every request carries `User-Agent: paysync/<version>` and `Accept: */*` (a
    /// request's own `Accept` wins), and goes out in origin form.
    #[tokio::test]
    async fn default_headers_on_direct_requests() {
        let (addr, heads) = recording_server().await;
        let client = HttpClient::with_proxies(None, &ClientOptions::default()).unwrap();
        let uri: Uri = format!("http://{addr}/api/x?a=1").parse().unwrap();
        assert_eq!(
            body_of(&client, Request::get(uri.clone())).await.unwrap(),
            "ok"
        );
        let json = Request::get(uri).header(ACCEPT, HeaderValue::from_static("application/json"));
        assert_eq!(body_of(&client, json).await.unwrap(), "ok");
        let heads = heads.lock().unwrap().clone();
        assert_eq!(heads.len(), 2);
        assert!(
            heads[0].starts_with("GET /api/x?a=1 HTTP/1.1\r\n"),
            "{}",
            heads[0]
        );
        assert!(
            heads[0].contains(&format!("user-agent: {USER_AGENT_VALUE}\r\n")),
            "{}",
            heads[0]
        );
        assert!(heads[0].contains("accept: */*\r\n"), "{}", heads[0]);
        assert!(
            heads[1].contains("accept: application/json\r\n"),
            "{}",
            heads[1]
        );
        assert!(!heads[1].contains("*/*"), "{}", heads[1]);
    }

    /// A plain-http request through a proxy goes to the proxy in absolute form, with
    /// `Proxy-Authorization` from the proxy URL's user info; the destination host is
    /// never resolved. A `NO_PROXY` host is reached directly.
    #[tokio::test]
    async fn http_through_a_proxy_is_absolute_form_with_credentials() {
        let (proxy, heads) = recording_server().await;
        let matcher = Matcher::builder()
            .http(format!("http://user:p%40ss@{proxy}"))
            .no("127.0.0.1")
            .build();
        let client = HttpClient::with_proxies(Some(matcher), &ClientOptions::default()).unwrap();
        let uri: Uri = "http://paysync-proxy-test.invalid/api/mer/x?o=a+b"
            .parse()
            .unwrap();
        assert_eq!(body_of(&client, Request::get(uri)).await.unwrap(), "ok");
        let head = heads.lock().unwrap()[0].clone();
        assert!(
            head.starts_with("GET http://paysync-proxy-test.invalid/api/mer/x?o=a+b HTTP/1.1\r\n"),
            "{head}"
        );
        // base64("user:p@ss")
        assert!(
            head.contains("proxy-authorization: Basic dXNlcjpwQHNz\r\n"),
            "{head}"
        );
        assert!(
            head.contains("host: paysync-proxy-test.invalid\r\n"),
            "{head}"
        );
        // A NO_PROXY host is reached directly: origin form, no credentials.
        let direct: Uri = format!("http://{proxy}/direct").parse().unwrap();
        assert_eq!(body_of(&client, Request::get(direct)).await.unwrap(), "ok");
        let head = heads.lock().unwrap()[1].clone();
        assert!(head.starts_with("GET /direct HTTP/1.1\r\n"), "{head}");
        assert!(!head.contains("proxy-authorization"), "{head}");
    }

    /// A CONNECT proxy that records the CONNECT head, then tunnels to `target`
    /// whatever host was asked for.
    async fn connect_proxy(target: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&heads);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let seen = Arc::clone(&seen);
                tokio::spawn(async move {
                    let mut reader = BufReader::new(tcp);
                    let head = read_head(&mut reader).await;
                    seen.lock().unwrap().push(head);
                    let mut upstream = tokio::net::TcpStream::connect(target).await.unwrap();
                    let mut client = reader.into_inner();
                    client
                        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .await
                        .unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
            }
        });
        (addr, heads)
    }

    /// A TLS server with the self-signed test certificate; counts completed handshakes.
    async fn self_signed_tls_server() -> (SocketAddr, Arc<std::sync::atomic::AtomicU64>) {
        use std::sync::atomic::{AtomicU64, Ordering};
        use tokio_rustls::rustls as server_rustls;
        let cert = server_rustls::pki_types::CertificateDer::from(
            include_bytes!("../../tests/e2e/fixtures/self-signed-cert.der").to_vec(),
        );
        let key = server_rustls::pki_types::PrivateKeyDer::Pkcs8(
            include_bytes!("../../tests/e2e/fixtures/self-signed-key.der")
                .to_vec()
                .into(),
        );
        let config = server_rustls::ServerConfig::builder_with_provider(Arc::new(
            server_rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handshakes = Arc::new(AtomicU64::new(0));
        let done = Arc::clone(&handshakes);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, done) = (acceptor.clone(), Arc::clone(&done));
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(tcp).await {
                        done.fetch_add(1, Ordering::SeqCst);
                        let mut buf = [0u8; 1024];
                        let _ = tls.read(&mut buf).await;
                    }
                });
            }
        });
        (addr, handshakes)
    }

    /// An https request through a proxy opens a CONNECT tunnel to the destination's
    /// host and port 443 (credentials in the CONNECT), then speaks TLS end to end:
    /// the destination's certificate is verified, so a self-signed one is refused
    /// and no TLS session is completed.
    #[tokio::test]
    async fn https_through_a_proxy_tunnels_and_verifies_the_certificate() {
        use std::sync::atomic::Ordering;
        let (tls_server, handshakes) = self_signed_tls_server().await;
        let (proxy, heads) = connect_proxy(tls_server).await;
        let matcher = Matcher::builder()
            .https(format!("http://user:pw@{proxy}"))
            .build();
        let client = HttpClient::with_proxies(Some(matcher), &ClientOptions::default()).unwrap();
        let uri: Uri = "https://paysync-proxy-test.invalid/api/x".parse().unwrap();
        let err = body_of(&client, Request::get(uri)).await.unwrap_err();
        assert!(err.contains("certificate"), "{err}");
        assert!(!err.contains("paysync-proxy-test"), "{err}");
        let head = heads.lock().unwrap()[0].clone();
        assert!(
            head.starts_with("CONNECT paysync-proxy-test.invalid:443 HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.contains("proxy-authorization: Basic dXNlcjpwdw==\r\n"),
            "{head}"
        );
        assert_eq!(handshakes.load(Ordering::SeqCst), 0);
    }

    /// A SOCKS proxy URL is refused with a clear error rather than ignored.
    #[tokio::test]
    async fn socks_proxies_are_refused() {
        let matcher = Matcher::builder().all("socks5://127.0.0.1:1").build();
        let client = HttpClient::with_proxies(Some(matcher), &ClientOptions::default()).unwrap();
        let uri: Uri = "http://paysync-proxy-test.invalid/x".parse().unwrap();
        let err = body_of(&client, Request::get(uri)).await.unwrap_err();
        assert!(err.contains("only http:// and https:// proxies"), "{err}");
    }
}
