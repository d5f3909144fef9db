//! Serving https: the rustls setup of a server certificate ([`server_tls`],
//! [`from_pem`]) and an axum listener that completes TLS handshakes side by side
//! before a connection is served ([`TlsListener`]). The daemon's metrics endpoint
//! (`metrics.tls_*_file`) and `paysync mock-server --tls-cert/--tls-key` use it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Why a certificate and key could not make a server setup. Messages name the
/// PEM section at fault, never the key's bytes.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("is not a PEM file ({0})")]
    Certificate(String),
    #[error("holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificate,
    #[error("holds no usable PEM private key ({0})")]
    Key(String),
    #[error("cannot be used with the certificate: {0}")]
    Mismatch(String),
}

/// The server setup of [`server_tls`] from PEM text: the certificate chain (its
/// own certificate first; other PEM sections are skipped) and the private key.
pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<rustls::ServerConfig, PemError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::Certificate(e.to_string()))?;
    if chain.is_empty() {
        return Err(PemError::NoCertificate);
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| PemError::Key(e.to_string()))?;
    server_tls(chain, key).map_err(|e| PemError::Mismatch(e.to_string()))
}

/// The TLS setup of an https endpoint serving `chain` (its own certificate first)
/// with `key`: TLS 1.2 and 1.3 (rustls, ring), HTTP/2 or http/1.1 through ALPN.
/// Fails when the key does not belong to the certificate.
pub fn server_tls(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Time a client gets to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at most; further connections wait in the backlog.
const MAX_HANDSHAKES: usize = 64;

/// A TCP listener whose connections are served only after a TLS handshake. The
/// handshakes run side by side, each with a deadline, so a client that connects
/// and then says nothing holds up no one.
pub struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    handshakes: JoinSet<Option<(TlsStream<TcpStream>, SocketAddr)>>,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> Self {
        Self {
            tcp,
            acceptor: TlsAcceptor::from(config),
            handshakes: JoinSet::new(),
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                accepted = self.tcp.accept(), if self.handshakes.len() < MAX_HANDSHAKES => {
                    match accepted {
                        Ok((tcp, addr)) => {
                            // Small request/answer pairs: do not let Nagle delay them.
                            let _ = tcp.set_nodelay(true);
                            let acceptor = self.acceptor.clone();
                            self.handshakes.spawn(async move {
                                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                                    Ok(Ok(tls)) => Some((tls, addr)),
                                    Ok(Err(e)) => {
                                        tracing::debug!(%addr, error = %e, "TLS handshake failed");
                                        None
                                    }
                                    Err(_) => {
                                        tracing::debug!(%addr, "TLS handshake timed out");
                                        None
                                    }
                                }
                            });
                        }
                        // Out of file descriptors and the like: wait, as axum does.
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
                Some(done) = self.handshakes.join_next() => {
                    if let Ok(Some(conn)) = done {
                        return conn;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERT: &[u8] = include_bytes!("../tests/e2e/fixtures/localhost-cert.pem");
    const KEY: &[u8] = include_bytes!("../tests/e2e/fixtures/localhost-key.pem");
    const OTHER_KEY: &[u8] = include_bytes!("../tests/e2e/fixtures/self-signed-key.pem");

    /// A matching pair gives a setup offering h2 then http/1.1; each kind of bad
    /// input gets its own error, and no message carries the key's text.
    #[test]
    fn from_pem_checks_each_part() {
        let config = from_pem(CERT, KEY).expect("the fixture pair matches");
        assert_eq!(
            config.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        let cert_and_other_sections = [KEY, CERT].concat();
        assert!(from_pem(&cert_and_other_sections, KEY).is_ok());

        let torn = &CERT[..CERT.len() / 2];
        type Case<'a> = (&'a [u8], &'a [u8], fn(&PemError) -> bool);
        let cases: [Case<'_>; 4] = [
            (torn, KEY, |e| matches!(e, PemError::Certificate(_))),
            (b"", KEY, |e| matches!(e, PemError::NoCertificate)),
            (CERT, b"no key here", |e| matches!(e, PemError::Key(_))),
            (CERT, OTHER_KEY, |e| matches!(e, PemError::Mismatch(_))),
        ];
        let key_line = std::str::from_utf8(OTHER_KEY)
            .unwrap()
            .lines()
            .nth(1)
            .unwrap();
        for (cert, key, expected) in cases {
            let e = from_pem(cert, key).expect_err("refused");
            assert!(expected(&e), "{e:?}");
            assert!(!e.to_string().contains(key_line), "{e}");
        }
    }
}
