//! TLS and basic auth for the API and `/metrics`, configured the way
//! Prometheus's exporter-toolkit `web-config` is (`tls_server_config`,
//! `basic_auth_users` with bcrypt hashes), so a network team's existing
//! certificates and scrape configs carry over.

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use serde::{Deserialize, Serialize};

/// `api.tls_server_config`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsServerConfig {
    /// PEM certificate chain, the server's certificate first. Relative to the
    /// agent config's directory.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the certificate.
    pub key_file: PathBuf,
    #[serde(default)]
    pub client_auth_type: ClientAuth,
    /// PEM CA certificates that client certificates must chain to.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

/// As web-config spells them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum ClientAuth {
    #[default]
    NoClientCert,
    /// A client may present a certificate; one that does not verify is refused.
    VerifyClientCertIfGiven,
    /// Every client must present a certificate that verifies against `client_ca_file`.
    RequireAndVerifyClientCert,
}

/// What is wrong, and with which field of `tls_server_config`.
#[derive(Debug)]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
}

fn at(field: &'static str, message: impl Into<String>) -> FieldError {
    FieldError { field, message: message.into() }
}

/// A usable server configuration, and what `check` should warn about (a
/// certificate that expired or is not valid yet: an error at start).
pub struct Loaded {
    pub server: Arc<ServerConfig>,
    pub warnings: Vec<FieldError>,
}

fn certs(path: &Path, field: &'static str) -> Result<Vec<CertificateDer<'static>>, FieldError> {
    let text = std::fs::read(path).map_err(|e| at(field, format!("{}: cannot read: {e}", path.display())))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<_, _>>()
        .map_err(|e| at(field, format!("{}: not a PEM certificate file: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(at(field, format!("{}: no certificate (BEGIN CERTIFICATE) in it", path.display())));
    }
    Ok(certs)
}

/// Reads and checks the files: the certificate and key parse and belong
/// together, the client CA exists when client certificates are asked for.
pub fn load(c: &TlsServerConfig, now: SystemTime) -> Result<Loaded, FieldError> {
    let chain = certs(&c.cert_file, "cert_file")?;
    let key_text = std::fs::read(&c.key_file)
        .map_err(|e| at("key_file", format!("{}: cannot read: {e}", c.key_file.display())))?;
    let key = PrivateKeyDer::from_pem_slice(&key_text)
        .map_err(|e| at("key_file", format!("{}: not a PEM private key: {e}", c.key_file.display())))?;
    let mut warnings = Vec::new();
    if let Some(w) = validity(&chain[0], now).map_err(|m| at("cert_file", m))? {
        warnings.push(at("cert_file", format!("{}: {w}", c.cert_file.display())));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| at("cert_file", format!("TLS setup: {e}")))?;
    let builder = match (c.client_auth_type, &c.client_ca_file) {
        (ClientAuth::NoClientCert, _) => builder.with_no_client_auth(),
        (_, None) => {
            return Err(at(
                "client_ca_file",
                format!(
                    "client_auth_type {:?} needs client_ca_file (the CA client certificates chain to)",
                    c.client_auth_type
                ),
            ));
        }
        (mode, Some(ca)) => {
            let mut roots = RootCertStore::empty();
            for cert in certs(ca, "client_ca_file")? {
                roots.add(cert).map_err(|e| at("client_ca_file", format!("{}: {e}", ca.display())))?;
            }
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let v = if mode == ClientAuth::VerifyClientCertIfGiven { v.allow_unauthenticated() } else { v };
            builder.with_client_cert_verifier(
                v.build().map_err(|e| at("client_ca_file", format!("{}: {e}", ca.display())))?,
            )
        }
    };
    let mut server = builder.with_single_cert(chain, key).map_err(|e| {
        let why = match e {
            rustls::Error::InconsistentKeys(_) => "the key does not belong to the certificate".to_string(),
            e => e.to_string(),
        };
        at("key_file", format!("{}: {why} ({})", c.key_file.display(), c.cert_file.display()))
    })?;
    // The API speaks HTTP/1.1 only.
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Loaded { server: Arc::new(server), warnings })
}

/// None when `now` is within the certificate's validity; else what is wrong.
fn validity(cert: &CertificateDer, now: SystemTime) -> Result<Option<String>, String> {
    let (_, x) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("the first certificate does not parse: {e}"))?;
    let v = x.validity();
    let now = now.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    Ok(if now > v.not_after.timestamp() {
        Some(format!("the certificate expired on {}", v.not_after))
    } else if now < v.not_before.timestamp() {
        Some(format!("the certificate is not valid before {}", v.not_before))
    } else {
        None
    })
}

/// Checks a bcrypt hash's form (`$2a$`, `$2b$`, `$2x$` or `$2y$`, a cost,
/// 53 characters of salt and hash).
pub fn check_hash(h: &str) -> Result<(), String> {
    h.parse::<bcrypt::HashParts>().map(|_| ()).map_err(|e| format!("not a bcrypt hash: {e}"))
}

/// `basic_auth_users` with a small cache of headers that verified (bcrypt
/// is deliberately slow; a scrape every 15 s should not pay it each time).
pub struct BasicAuth {
    users: BTreeMap<String, String>,
    verified: Mutex<HashSet<String>>,
}

/// Verified headers remembered at most.
const VERIFIED_MAX: usize = 64;

impl BasicAuth {
    pub fn new(users: BTreeMap<String, String>) -> BasicAuth {
        BasicAuth { users, verified: Mutex::new(HashSet::new()) }
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Whether `Authorization: Basic …` names a user with the right password.
    pub fn allows(&self, header: &str) -> bool {
        let Some(b64) = header.strip_prefix("Basic ") else { return false };
        if self.verified.lock().unwrap().contains(b64) {
            return true;
        }
        use base64::Engine;
        let decoded = base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok();
        let Some(plain) = decoded.and_then(|b| String::from_utf8(b).ok()) else { return false };
        let Some((user, pass)) = plain.split_once(':') else { return false };
        let ok = self.users.get(user).is_some_and(|h| bcrypt::verify(pass, h).unwrap_or(false));
        if ok {
            let mut v = self.verified.lock().unwrap();
            if v.len() >= VERIFIED_MAX {
                v.clear();
            }
            v.insert(b64.to_string());
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_checks_user_and_password() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        assert!(check_hash(&hash).is_ok());
        assert!(check_hash("$2y$10$tooshort").is_err());
        let a = BasicAuth::new(BTreeMap::from([("prometheus".to_string(), hash)]));
        // "prometheus:s3cret", "prometheus:wrong", "nobody:s3cret"
        assert!(a.allows("Basic cHJvbWV0aGV1czpzM2NyZXQ="));
        assert!(a.allows("Basic cHJvbWV0aGV1czpzM2NyZXQ="), "cached");
        assert!(!a.allows("Basic cHJvbWV0aGV1czp3cm9uZw=="));
        assert!(!a.allows("Basic bm9ib2R5OnMzY3JldA=="));
        assert!(!a.allows("Bearer cHJvbWV0aGV1czpzM2NyZXQ="));
        assert!(!a.allows("Basic %%%"));
    }
}
