//! TLS on both sides of the proxy.
//!
//! Towards the agent, the gateway serves a certificate the pod already trusts: it is minted
//! here (rcgen) from the cluster CA the admin provides, for the API server's names and
//! addresses (the pod's client verifies an IP host against IP SANs only, and sends no SNI
//! for it). Towards the real API server, the gateway verifies the upstream against the same
//! cluster CA bundle.

use std::{net::IpAddr, path::Path, sync::Arc};

use arc_swap::ArcSwap;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject as _};

/// ALPN protocols offered to agents, HTTP/2 first as the API server does.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN for HTTP/1.1 (upgrade requests such as exec always use it).
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Errors setting up TLS; each names the file or the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A PEM document held no certificate.
    #[error("{what}: no PEM certificate found")]
    NoCertificate {
        /// Which input.
        what: String,
    },
    /// A PEM document was not a certificate or key we understand.
    #[error("{what}: {message}")]
    Pem {
        /// Which input.
        what: String,
        /// The parser's complaint.
        message: String,
    },
    /// A CA private key in a format or of a type the gateway cannot sign with.
    #[error("{what}: {problem}; accepted: {ACCEPTED_CA_KEYS}")]
    CaKey {
        /// Which input.
        what: String,
        /// What is wrong with it.
        problem: String,
    },
    /// rcgen could not create or sign a certificate.
    #[error("minting certificate: {0}")]
    Mint(#[from] rcgen::Error),
    /// rustls rejected the certificate/key combination.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The CA certificate is past its `notAfter`: nothing it signs is trusted.
    #[error(
        "{what}: the CA certificate expired at {expired}; replace it (and the CA bundle agents trust)"
    )]
    CaExpired {
        /// Which input.
        what: String,
        /// When it expired (RFC 3339).
        expired: String,
    },
}

/// What `tls.caKeyFile` may hold, for error messages and docs.
pub const ACCEPTED_CA_KEYS: &str = "a PEM private key: PKCS#8 (BEGIN PRIVATE KEY; RSA, EC P-256/P-384 or Ed25519), PKCS#1 (BEGIN RSA PRIVATE KEY, as kubeadm writes) or SEC1 (BEGIN EC PRIVATE KEY, P-256/P-384, as openssl ecparam writes)";

/// OID of `rsaEncryption` (PKCS#1).
const OID_RSA: pkcs8::ObjectIdentifier =
    pkcs8::ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
/// OID of `id-ecPublicKey` (RFC 5480).
const OID_EC: pkcs8::ObjectIdentifier = pkcs8::ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");

/// Loads a CA signing key from PEM in any format clusters hand out. ring (rcgen's backend
/// here) signs with PKCS#8 keys only, so PKCS#1 and SEC1 keys are re-wrapped as PKCS#8
/// (RFC 5208/5958) first: the key material itself is not changed.
pub fn ca_key_pair_from_pem(pem: &str, what: &str) -> Result<KeyPair, TlsError> {
    use pkcs8::der::{Decode as _, Encode as _};
    let problem = |problem: String| TlsError::CaKey {
        what: what.to_owned(),
        problem,
    };
    let key = PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| problem(format!("no PEM private key found ({e})")))?;
    let pkcs8_der: Vec<u8> = match &key {
        PrivateKeyDer::Pkcs8(der) => der.secret_pkcs8_der().to_vec(),
        PrivateKeyDer::Pkcs1(der) => {
            let null = pkcs8::der::asn1::AnyRef::NULL;
            pkcs8::PrivateKeyInfo::new(
                pkcs8::AlgorithmIdentifierRef {
                    oid: OID_RSA,
                    parameters: Some(null),
                },
                der.secret_pkcs1_der(),
            )
            .to_der()
            .map_err(|e| problem(format!("PKCS#1 RSA key: {e}")))?
        }
        PrivateKeyDer::Sec1(der) => {
            let ec = sec1::EcPrivateKey::from_der(der.secret_sec1_der())
                .map_err(|e| problem(format!("SEC1 EC key: {e}")))?;
            let curve = ec
                .parameters
                .and_then(|p| p.named_curve())
                .ok_or_else(|| problem("SEC1 EC key names no curve".to_owned()))?;
            if ec.public_key.is_none() {
                return Err(problem(
                    "SEC1 EC key without its public key (write it with openssl ec, which includes it)"
                        .to_owned(),
                ));
            }
            // The curve moves to the AlgorithmIdentifier, as RFC 5915 section 3 asks.
            let inner = sec1::EcPrivateKey {
                parameters: None,
                ..ec
            }
            .to_der()
            .map_err(|e| problem(format!("SEC1 EC key: {e}")))?;
            let curve_der = curve
                .to_der()
                .map_err(|e| problem(format!("SEC1 EC key: {e}")))?;
            let curve_any = pkcs8::der::asn1::AnyRef::from_der(&curve_der)
                .map_err(|e| problem(format!("SEC1 EC key: {e}")))?;
            pkcs8::PrivateKeyInfo::new(
                pkcs8::AlgorithmIdentifierRef {
                    oid: OID_EC,
                    parameters: Some(curve_any),
                },
                &inner,
            )
            .to_der()
            .map_err(|e| problem(format!("SEC1 EC key: {e}")))?
        }
        _ => return Err(problem("unsupported private key encoding".to_owned())),
    };
    let format = match key {
        PrivateKeyDer::Pkcs1(_) => "PKCS#1",
        PrivateKeyDer::Sec1(_) => "SEC1",
        _ => "PKCS#8",
    };
    // rcgen's own error ("Could not parse key pair") says nothing more than this.
    KeyPair::try_from(&PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8_der))).map_err(|_| {
        problem(format!(
            "{format} key could not be used for signing: not an RSA, EC P-256/P-384 or Ed25519 key, or damaged"
        ))
    })
}

/// The crypto provider used everywhere (ring: small, no C toolchain beyond cc).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate authority that can mint serving certificates.
pub struct CertificateAuthority {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate's `notAfter`: no certificate it mints outlives it.
    not_after: std::time::SystemTime,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the signing key.
        f.debug_struct("CertificateAuthority")
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Loads a CA from PEM files (certificate, and its PKCS#8/PKCS#1/SEC1 private key).
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let cert_pem = read(cert)?;
        let key_pem = read(key)?;
        Self::from_pem(
            &cert_pem,
            &key_pem,
            &cert.display().to_string(),
            &key.display().to_string(),
        )
    }

    /// Loads a CA from PEM text; `cert_name`/`key_name` are used in error messages.
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        cert_name: &str,
        key_name: &str,
    ) -> Result<Self, TlsError> {
        let cert_der = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .next()
            .ok_or_else(|| TlsError::NoCertificate {
                what: cert_name.to_owned(),
            })?
            .map_err(|e| TlsError::Pem {
                what: cert_name.to_owned(),
                message: e.to_string(),
            })?;
        let key = ca_key_pair_from_pem(key_pem, key_name)?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| TlsError::Pem {
            what: cert_name.to_owned(),
            message: e.to_string(),
        })?;
        let not_after = not_after(&cert_der).ok_or_else(|| TlsError::Pem {
            what: cert_name.to_owned(),
            message: "the certificate's validity cannot be read".to_owned(),
        })?;
        if not_after <= std::time::SystemTime::now() {
            return Err(TlsError::CaExpired {
                what: cert_name.to_owned(),
                expired: rfc3339(not_after),
            });
        }
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            cert_der,
            issuer,
            not_after,
        })
    }

    /// Generates a fresh self-signed CA (for tests, the demo, and the test API server).
    pub fn generate(common_name: &str) -> Result<(Self, String), TlsError> {
        let key = KeyPair::generate()?;
        let key_pem = key.serialize_pem();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(365);
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        let cert_der = cert.der().clone();
        let not_after = std::time::SystemTime::from(params.not_after);
        Ok((
            Self {
                cert_pem,
                cert_der,
                issuer: Issuer::new(params, key),
                not_after,
            },
            key_pem,
        ))
    }

    /// The CA certificate in PEM form (what clients put in their trust bundle).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate in DER form.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// When the CA certificate expires.
    pub fn expires(&self) -> std::time::SystemTime {
        self.not_after
    }

    /// Mints a serving certificate (chain: leaf, CA) and its key for the given DNS names and
    /// IP addresses, valid for `validity` from now.
    pub fn issue_server_cert(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
        validity: std::time::Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            dns_names
                .first()
                .cloned()
                .unwrap_or_else(|| "chaperone".to_owned()),
        );
        for name in dns_names {
            params
                .subject_alt_names
                .push(SanType::DnsName(name.clone().try_into()?));
        }
        params
            .subject_alt_names
            .extend(ips.iter().copied().map(SanType::IpAddress));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        // Never past the CA's own end: clients would refuse the chain from then on anyway.
        params.not_after = (now
            + time::Duration::try_from(validity).unwrap_or(time::Duration::days(365)))
        .min(time::OffsetDateTime::from(self.not_after));
        if params.not_after <= now {
            return Err(TlsError::CaExpired {
                what: "the CA (tls.caCertFile)".to_owned(),
                expired: rfc3339(self.not_after),
            });
        }
        let cert = params.signed_by(&key, &self.issuer)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((vec![cert.der().clone(), self.cert_der.clone()], key_der))
    }
}

/// A certificate's `notAfter`, from its DER.
fn not_after(der: &CertificateDer<'_>) -> Option<std::time::SystemTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let seconds = cert.validity().not_after.timestamp();
    let seconds = u64::try_from(seconds).ok()?;
    std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(seconds))
}

/// A time as RFC 3339 (UTC), for messages.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    jiff::Timestamp::try_from(t).map_or_else(|_| format!("{t:?}"), |t| t.to_string())
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// How long before the CA's expiry the renewal loop warns at every check.
const CA_EXPIRY_WARNING: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// The serving certificate, minted from the cluster CA and re-minted before it expires.
///
/// rustls asks [`ResolvesServerCert::resolve`] on every handshake, so a renewal takes effect
/// for new connections at once without restarting the listener. The same certificate
/// serves every name (SNI or none: clients dialling an IP send none).
#[derive(Debug)]
pub struct ServingCert {
    ca: CertificateAuthority,
    dns_names: Vec<String>,
    ips: Vec<IpAddr>,
    validity: std::time::Duration,
    current: ArcSwap<(rustls::sign::CertifiedKey, std::time::SystemTime)>,
}

impl ServingCert {
    /// Mints the first certificate.
    pub fn new(
        ca: CertificateAuthority,
        dns_names: Vec<String>,
        ips: Vec<IpAddr>,
        validity: std::time::Duration,
    ) -> Result<Arc<Self>, TlsError> {
        let first = Self::mint(&ca, &dns_names, &ips, validity)?;
        Ok(Arc::new(Self {
            ca,
            dns_names,
            ips,
            validity,
            current: ArcSwap::from_pointee(first),
        }))
    }

    fn mint(
        ca: &CertificateAuthority,
        dns_names: &[String],
        ips: &[IpAddr],
        validity: std::time::Duration,
    ) -> Result<(rustls::sign::CertifiedKey, std::time::SystemTime), TlsError> {
        let (chain, key) = ca.issue_server_cert(dns_names, ips, validity)?;
        let expires = not_after(&chain[0])
            .unwrap_or_else(|| std::time::SystemTime::now() + validity)
            .min(ca.expires());
        let key = rustls::sign::CertifiedKey::from_der(chain, key, &provider())?;
        Ok((key, expires))
    }

    /// When the current certificate expires.
    pub fn expires(&self) -> std::time::SystemTime {
        self.current.load().1
    }

    /// When the CA it is minted from expires: renewals stop there.
    pub fn ca_expires(&self) -> std::time::SystemTime {
        self.ca.expires()
    }

    /// The DER of the current leaf certificate.
    pub fn leaf(&self) -> CertificateDer<'static> {
        self.current.load().0.cert[0].clone()
    }

    /// Whether less than a third of the validity is left at `now` (and a new certificate
    /// would last longer: not once it ends with the CA).
    pub fn renewal_due(&self, now: std::time::SystemTime) -> bool {
        self.expires() < self.ca_expires()
            && self
                .expires()
                .duration_since(now)
                .map_or(true, |left| left < self.validity / 3)
    }

    /// Mints a new certificate now; new handshakes get it at once.
    pub fn renew(&self) -> Result<(), TlsError> {
        let next = Self::mint(&self.ca, &self.dns_names, &self.ips, self.validity)?;
        self.current.store(Arc::new(next));
        Ok(())
    }

    /// Renews whenever due, checking every `every`, until the drain starts.
    pub async fn renewal_loop(
        self: Arc<Self>,
        every: std::time::Duration,
        drain: crate::drain::DrainWatcher,
    ) {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = drain.signaled() => return,
                _ = tick.tick() => {}
            }
            let now = std::time::SystemTime::now();
            if self
                .ca_expires()
                .duration_since(now)
                .map_or(true, |left| left < CA_EXPIRY_WARNING)
            {
                tracing::warn!(
                    ca_expires = %rfc3339(self.ca_expires()),
                    "the CA (tls.caCertFile) the serving certificate is minted from expires soon; after it, agents' clients refuse the gateway: replace it"
                );
            }
            if self.renewal_due(now) {
                match self.renew() {
                    Ok(()) => {
                        tracing::info!(expires = ?self.expires(), "serving certificate renewed")
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "renewing the serving certificate failed; keeping the old one")
                    }
                }
            }
        }
    }
}

impl rustls::server::ResolvesServerCert for ServingCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(Arc::new(self.current.load().0.clone()))
    }
}

/// Server config that takes its certificate from `cert` on every handshake, offering
/// HTTP/2 and HTTP/1.1 by ALPN.
pub fn server_config_rotating(cert: Arc<ServingCert>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
    Ok(Arc::new(config))
}

/// Generates a CA and writes its certificate and key (the key readable by the owner only).
pub fn create_ca_files(cert: &Path, key: &Path, common_name: &str) -> Result<(), TlsError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let (ca, key_pem) = CertificateAuthority::generate(common_name)?;
    let io = |path: &Path, source| TlsError::Read {
        path: path.display().to_string(),
        source,
    };
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(key)
        .and_then(|mut f| f.write_all(key_pem.as_bytes()))
        .map_err(|e| io(key, e))?;
    std::fs::write(cert, ca.cert_pem()).map_err(|e| io(cert, e))
}

/// Parses every certificate in a PEM bundle into a root store.
pub fn root_store_from_pem(pem: &str, what: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|e| TlsError::Pem {
            what: what.to_owned(),
            message: e.to_string(),
        })?;
        roots.add(cert).map_err(|e| TlsError::Pem {
            what: what.to_owned(),
            message: e.to_string(),
        })?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoCertificate {
            what: what.to_owned(),
        });
    }
    Ok(roots)
}

/// Loads a root store from a PEM bundle file.
pub fn root_store_from_file(path: &Path) -> Result<RootCertStore, TlsError> {
    root_store_from_pem(&read(path)?, &path.display().to_string())
}

/// Server config offering HTTP/2 and HTTP/1.1 by ALPN; clients offering no ALPN at all
/// (client-go's SPDY dialer) get HTTP/1.1.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
    Ok(Arc::new(config))
}

/// Loads a client certificate chain and its key (PEM files) for authenticating to the API
/// server.
pub fn load_client_identity(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    client_identity_from_pem(
        read(cert)?.as_bytes(),
        read(key)?.as_bytes(),
        &cert.display().to_string(),
        &key.display().to_string(),
    )
}

/// Parses a client certificate chain and its key (PEM); `cert_what`/`key_what` name them
/// in errors.
pub fn client_identity_from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_what: &str,
    key_what: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what: cert_what.to_owned(),
            message: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            what: cert_what.to_owned(),
        });
    }
    let key_der = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Pem {
        what: key_what.to_owned(),
        message: e.to_string(),
    })?;
    Ok((chain, key_der))
}

/// Client config for the upstream API server with an optional client certificate.
pub fn client_config_with_identity(
    roots: RootCertStore,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    })
}

/// Client config for the upstream API server, verifying it against `roots`. ALPN is left
/// empty: the HTTP connector sets it to the protocols it enables.
pub fn client_config(roots: RootCertStore) -> Result<ClientConfig, TlsError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_cert_chains_to_the_ca_and_round_trips_through_pem() {
        let (ca, key_pem) = CertificateAuthority::generate("test-ca").unwrap();
        let reloaded =
            CertificateAuthority::from_pem(ca.cert_pem(), &key_pem, "ca.crt", "ca.key").unwrap();
        let (chain, key) = reloaded
            .issue_server_cert(
                &["kubernetes.default.svc".to_owned()],
                &["127.0.0.1".parse().unwrap()],
                std::time::Duration::from_secs(3600),
            )
            .unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(&chain[1], ca.cert_der());
        server_config(chain, key).unwrap();
        root_store_from_pem(ca.cert_pem(), "ca.crt").unwrap();
    }

    /// Runs openssl (present on every machine of this project) and panics with its stderr.
    fn openssl(dir: &Path, args: &[&str]) {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| panic!("run openssl {args:?}: {e}"));
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// CA keys as real clusters hand them over: kubeadm's PKCS#1 RSA, `openssl ecparam`'s
    /// SEC1 EC, and PKCS#8 of every type; each signs a serving certificate that openssl
    /// verifies against the CA.
    #[test]
    fn ca_keys_in_pkcs1_sec1_and_pkcs8_sign_certificates_that_verify() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let cases: &[(&str, &[&str], &str)] = &[
            (
                "rsa-pkcs1",
                &["genrsa", "-traditional", "-out", "rsa-pkcs1.key", "2048"],
                "BEGIN RSA PRIVATE KEY",
            ),
            (
                "rsa-pkcs8",
                &[
                    "genpkey",
                    "-algorithm",
                    "RSA",
                    "-pkeyopt",
                    "rsa_keygen_bits:2048",
                    "-out",
                    "rsa-pkcs8.key",
                ],
                "BEGIN PRIVATE KEY",
            ),
            (
                "p256-sec1",
                &[
                    "ecparam",
                    "-genkey",
                    "-name",
                    "prime256v1",
                    "-noout",
                    "-out",
                    "p256-sec1.key",
                ],
                "BEGIN EC PRIVATE KEY",
            ),
            (
                "p384-sec1",
                &[
                    "ecparam",
                    "-genkey",
                    "-name",
                    "secp384r1",
                    "-noout",
                    "-out",
                    "p384-sec1.key",
                ],
                "BEGIN EC PRIVATE KEY",
            ),
            (
                "p256-pkcs8",
                &[
                    "genpkey",
                    "-algorithm",
                    "EC",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-out",
                    "p256-pkcs8.key",
                ],
                "BEGIN PRIVATE KEY",
            ),
            (
                "ed25519",
                &["genpkey", "-algorithm", "ed25519", "-out", "ed25519.key"],
                "BEGIN PRIVATE KEY",
            ),
        ];
        for (name, genkey, label) in cases {
            openssl(d, genkey);
            let key_file = d.join(format!("{name}.key"));
            let key_pem = std::fs::read_to_string(&key_file).unwrap();
            assert!(key_pem.contains(label), "{name}: openssl wrote {key_pem}");
            let cert = format!("{name}.crt");
            openssl(
                d,
                &[
                    "req",
                    "-x509",
                    "-new",
                    "-key",
                    &format!("{name}.key"),
                    "-subj",
                    "/CN=test-ca",
                    "-days",
                    "1",
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                    "-out",
                    &cert,
                ],
            );
            let ca = CertificateAuthority::from_files(&d.join(&cert), &key_file)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let (chain, _) = ca
                .issue_server_cert(
                    &["kubernetes.default.svc".to_owned()],
                    &["127.0.0.1".parse().unwrap()],
                    std::time::Duration::from_secs(3600),
                )
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let der = format!("{name}-leaf.der");
            let leaf = format!("{name}-leaf.pem");
            std::fs::write(d.join(&der), &chain[0]).unwrap();
            openssl(d, &["x509", "-inform", "DER", "-in", &der, "-out", &leaf]);
            openssl(d, &["verify", "-CAfile", &cert, &leaf]);
        }
    }

    #[test]
    fn unusable_ca_keys_are_refused_naming_the_file_and_the_accepted_formats() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        openssl(d, &["genpkey", "-algorithm", "ed448", "-out", "ed448.key"]);
        openssl(
            d,
            &[
                "ecparam",
                "-genkey",
                "-name",
                "secp521r1",
                "-noout",
                "-out",
                "p521.key",
            ],
        );
        let (ca, _) = CertificateAuthority::generate("test-ca").unwrap();
        let read = |f: &str| std::fs::read_to_string(d.join(f)).unwrap();
        let cases = [
            (
                "ed448.key",
                read("ed448.key"),
                "could not be used for signing",
            ),
            (
                "p521.key",
                read("p521.key"),
                "could not be used for signing",
            ),
            (
                "cert-as-key.pem",
                ca.cert_pem().to_owned(),
                "no PEM private key found",
            ),
            (
                "garbage.key",
                "hello".to_owned(),
                "no PEM private key found",
            ),
        ];
        for (name, pem, problem) in cases {
            let err = ca_key_pair_from_pem(&pem, name)
                .err()
                .unwrap_or_else(|| panic!("{name} loaded"));
            let text = err.to_string();
            assert!(
                text.starts_with(name) && text.contains(problem),
                "{name}: {text}"
            );
            assert!(
                text.contains("PKCS#1 (BEGIN RSA PRIVATE KEY"),
                "{name}: {text}"
            );
            assert_eq!(
                text.matches("Could not parse key pair").count(),
                0,
                "{text}"
            );
        }
    }

    /// A self-signed CA valid until `offset` from now (negative: expired), as PEM.
    fn ca_until(offset: time::Duration) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(400);
        params.not_after = now + offset;
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn an_expired_ca_is_refused_and_no_certificate_outlives_its_ca() {
        let (cert, key) = ca_until(-time::Duration::days(1));
        let err = CertificateAuthority::from_pem(&cert, &key, "ca.crt", "ca.key").unwrap_err();
        assert!(
            matches!(&err, TlsError::CaExpired { what, .. } if what == "ca.crt"),
            "{err}"
        );
        assert!(err.to_string().contains("expired at"), "{err}");

        // A CA with an hour left: the 90-day serving certificate ends with it, and
        // renewing would not help, so it is not due.
        let (cert, key) = ca_until(time::Duration::hours(1));
        let ca = CertificateAuthority::from_pem(&cert, &key, "ca.crt", "ca.key").unwrap();
        let hour = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
        let ca_end = ca.expires();
        assert!(
            ca_end <= hour && ca_end + std::time::Duration::from_secs(5) > hour,
            "{ca_end:?}"
        );
        let serving = ServingCert::new(
            ca,
            vec!["kubernetes".to_owned()],
            vec![],
            std::time::Duration::from_secs(90 * 24 * 3600),
        )
        .unwrap();
        assert_eq!(serving.expires(), ca_end);
        assert_eq!(not_after(&serving.leaf()), Some(ca_end));
        assert!(!serving.renewal_due(std::time::SystemTime::now()));
    }

    #[test]
    fn serving_cert_renews_when_a_third_of_its_validity_is_left() {
        let (ca, _) = CertificateAuthority::generate("test-ca").unwrap();
        let validity = std::time::Duration::from_secs(3000);
        let cert = ServingCert::new(ca, vec!["kubernetes".to_owned()], vec![], validity).unwrap();
        let now = std::time::SystemTime::now();
        assert!(!cert.renewal_due(now), "a fresh certificate is not due");
        assert!(
            cert.renewal_due(now + std::time::Duration::from_secs(2100)),
            "due with < 1/3 left"
        );
        assert!(cert.renewal_due(now + validity * 2), "due once expired");
        let before = cert.leaf();
        cert.renew().unwrap();
        assert_ne!(cert.leaf(), before, "renewal must mint a new certificate");
        server_config_rotating(cert).unwrap();
    }

    #[test]
    fn gateway_ca_files_are_created_once_with_a_private_key() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("ca.crt"), dir.path().join("ca.key"));
        create_ca_files(&cert, &key, "gateway-ca").unwrap();
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        CertificateAuthority::from_files(&cert, &key).unwrap();
        let err = create_ca_files(&cert, &key, "gateway-ca")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ca.key"),
            "an existing key must never be overwritten: {err}"
        );
    }

    #[test]
    fn client_identity_loads_into_a_client_config() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = CertificateAuthority::generate("client-ca").unwrap();
        let (chain, key) = ca
            .issue_server_cert(
                &["gateway".to_owned()],
                &[],
                std::time::Duration::from_secs(60),
            )
            .unwrap();
        let pem = |tag: &str, der: &[u8]| {
            let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, der);
            format!("-----BEGIN {tag}-----\n{b64}\n-----END {tag}-----\n")
        };
        std::fs::write(dir.path().join("c.crt"), pem("CERTIFICATE", &chain[0])).unwrap();
        std::fs::write(
            dir.path().join("c.key"),
            pem("PRIVATE KEY", key.secret_der()),
        )
        .unwrap();
        let identity =
            load_client_identity(&dir.path().join("c.crt"), &dir.path().join("c.key")).unwrap();
        let roots = root_store_from_pem(ca.cert_pem(), "ca").unwrap();
        assert!(
            client_config_with_identity(roots, Some(identity))
                .unwrap()
                .client_auth_cert_resolver
                .has_certs()
        );
        std::fs::write(dir.path().join("bad.key"), "not a key").unwrap();
        let err = load_client_identity(&dir.path().join("c.crt"), &dir.path().join("bad.key"))
            .unwrap_err();
        assert!(err.to_string().contains("bad.key"), "{err}");
    }

    #[test]
    fn garbage_pem_is_rejected_with_the_file_name() {
        let err = root_store_from_pem("not a certificate", "cluster-ca.crt").unwrap_err();
        assert!(err.to_string().contains("cluster-ca.crt"), "{err}");
        let (ca, _) = CertificateAuthority::generate("x").unwrap();
        let err =
            CertificateAuthority::from_pem(ca.cert_pem(), "junk", "ca.crt", "ca.key").unwrap_err();
        assert!(err.to_string().contains("ca.key"), "{err}");
    }
}
