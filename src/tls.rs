//! TLS both ways, on rustls with aws-lc-rs: the API listener's certificate (following its
//! files), and the client configuration every outbound HTTPS call uses (Convocore, JWKS).

use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::{self, Config, ConfigError};
use crate::watch::Watched;

/// The API listener's TLS: certificate and key follow their files.
pub struct Tls {
    pub acceptor: tokio_rustls::TlsAcceptor,
}

struct Resolver(Arc<Watched<Arc<CertifiedKey>>>);

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.get().as_ref().clone())
    }
}

impl Tls {
    pub fn from_config(config: &Config, tls: &config::Tls) -> Result<Tls, ConfigError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let cert_path = config.resolve(&tls.cert_file);
        let key_path = config.resolve(&tls.key_file);
        // Certificate and key change together (cert-manager renews both): either change
        // reloads the pair, and a pair that does not match keeps the last good one.
        let provider_for_load = provider.clone();
        let certified = Watched::files(&[cert_path, key_path], move |files| {
            certified_key(&provider_for_load, &files[0], &files[1])
        })
        .map_err(|m| ConfigError::new(&config.path, "server.tls.cert_file", m))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ConfigError::new(&config.path, "server.tls", e))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(certified)));
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Tls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        })
    }
}

fn certified_key(
    provider: &rustls::crypto::CryptoProvider,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<CertifiedKey>, String> {
    let certs = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cert_file is not PEM: {e}"))?;
    if certs.is_empty() {
        return Err("cert_file holds no certificate".to_string());
    }
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| format!("key_file is not PEM: {e}"))?
        .ok_or_else(|| "key_file holds no private key".to_string())?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|_| "key_file: unsupported private key".to_string())?;
    let certified = CertifiedKey::new(certs, signing);
    certified
        .keys_match()
        .map_err(|_| "cert_file and key_file do not belong together".to_string())?;
    Ok(Arc::new(certified))
}

/// The TLS client configuration: webpki's roots plus an optional PEM bundle (`upstream.ca_file`),
/// ALPN h2 then http/1.1.
pub fn client_config(extra_ca: Option<&[u8]>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = extra_ca {
        let mut added = 0;
        for cert in rustls_pemfile::certs(&mut &pem[..]) {
            let cert = cert.map_err(|e| format!("not a PEM certificate bundle: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("unusable CA certificate: {e}"))?;
            added += 1;
        }
        if added == 0 {
            return Err("no PEM certificate found".to_string());
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS setup: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
