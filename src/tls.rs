//! TLS material: the certificate pgtether shows its clients (with its SCRAM channel binding
//! data), and how it checks upstream servers (sslmode). Built from files when the
//! configuration is loaded or reloaded, so a SIGHUP picks up renewed certificates for new
//! connections.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::Deserialize;
use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {detail}")]
    Read { path: String, detail: String },
    #[error("{path} holds no certificate")]
    NoCertificate { path: String },
    #[error("unusable certificate or key: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Why a certificate has no `tls-server-end-point` channel binding data. Not fatal: the
/// certificate still serves TLS, pgtether just does not offer SCRAM-SHA-256-PLUS with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindingError {
    #[error("the certificate cannot be parsed: {0}")]
    Unparsable(String),
    #[error("its signature algorithm ({0}) names no single hash function, so RFC 5929 defines no tls-server-end-point data for it")]
    NoHash(String),
}

/// What pgtether needs to serve TLS to clients, built together from one certificate file so
/// that a connection's handshake and its channel binding check always use the same
/// certificate.
#[derive(Clone)]
pub struct ServerTls {
    pub config: Arc<rustls::ServerConfig>,
    /// `tls-server-end-point` data of the leaf certificate (RFC 5929 §4.1), for
    /// SCRAM-SHA-256-PLUS.
    pub channel_binding: Result<Arc<[u8]>, BindingError>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("channel_binding", &self.channel_binding.is_ok())
            .finish_non_exhaustive()
    }
}

/// The hash `tls-server-end-point` uses for a certificate signed with `algorithm` (RFC 5929
/// §4.1): the signature's own hash, except MD5 and SHA-1, which are replaced by SHA-256.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BindingHash {
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

/// Signature algorithm OIDs (dotted) and the hash they use. RSASSA-PSS carries its hash in
/// its parameters and is handled apart; EdDSA hashes internally and has no entry.
const SIGNATURE_HASHES: &[(&str, BindingHash)] = &[
    ("1.2.840.113549.1.1.4", BindingHash::Sha256), // md5WithRSAEncryption
    ("1.2.840.113549.1.1.5", BindingHash::Sha256), // sha1WithRSAEncryption
    ("1.2.840.113549.1.1.14", BindingHash::Sha224), // sha224WithRSAEncryption
    ("1.2.840.113549.1.1.11", BindingHash::Sha256), // sha256WithRSAEncryption
    ("1.2.840.113549.1.1.12", BindingHash::Sha384), // sha384WithRSAEncryption
    ("1.2.840.113549.1.1.13", BindingHash::Sha512), // sha512WithRSAEncryption
    ("1.2.840.10045.4.1", BindingHash::Sha256),    // ecdsa-with-SHA1
    ("1.2.840.10045.4.3.1", BindingHash::Sha224),  // ecdsa-with-SHA224
    ("1.2.840.10045.4.3.2", BindingHash::Sha256),  // ecdsa-with-SHA256
    ("1.2.840.10045.4.3.3", BindingHash::Sha384),  // ecdsa-with-SHA384
    ("1.2.840.10045.4.3.4", BindingHash::Sha512),  // ecdsa-with-SHA512
    ("1.2.840.10040.4.3", BindingHash::Sha256),    // dsa-with-sha1
    ("2.16.840.1.101.3.4.3.1", BindingHash::Sha224), // dsa-with-sha224
    ("2.16.840.1.101.3.4.3.2", BindingHash::Sha256), // dsa-with-sha256
];

/// Hash algorithm OIDs that may appear in RSASSA-PSS parameters.
const PSS_HASHES: &[(&str, BindingHash)] = &[
    ("1.3.14.3.2.26", BindingHash::Sha256), // SHA-1 (also the default when absent)
    ("2.16.840.1.101.3.4.2.4", BindingHash::Sha224),
    ("2.16.840.1.101.3.4.2.1", BindingHash::Sha256),
    ("2.16.840.1.101.3.4.2.2", BindingHash::Sha384),
    ("2.16.840.1.101.3.4.2.3", BindingHash::Sha512),
];

const RSASSA_PSS: &str = "1.2.840.113549.1.1.10";

/// The `tls-server-end-point` channel binding data of a certificate (DER): its hash with the
/// hash of its signature algorithm, as PostgreSQL computes it for SCRAM-SHA-256-PLUS.
pub fn tls_server_end_point(cert_der: &[u8]) -> Result<Vec<u8>, BindingError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) =
        X509Certificate::from_der(cert_der).map_err(|e| BindingError::Unparsable(e.to_string()))?;
    let algorithm = &cert.signature_algorithm;
    let oid = algorithm.algorithm.to_id_string();
    let lookup = |table: &[(&str, BindingHash)], oid: &str| {
        table.iter().find(|(o, _)| *o == oid).map(|(_, h)| *h)
    };
    let hash = if oid == RSASSA_PSS {
        let params = algorithm
            .parameters
            .as_ref()
            .ok_or_else(|| BindingError::Unparsable("RSASSA-PSS without parameters".into()))?;
        let params = x509_parser::signature_algorithm::RsaSsaPssParams::try_from(params)
            .map_err(|e| BindingError::Unparsable(format!("RSASSA-PSS parameters: {e}")))?;
        let hash_oid = params.hash_algorithm_oid().to_id_string();
        lookup(PSS_HASHES, &hash_oid)
            .ok_or_else(|| BindingError::NoHash(format!("RSASSA-PSS with hash {hash_oid}")))?
    } else {
        lookup(SIGNATURE_HASHES, &oid).ok_or(BindingError::NoHash(oid))?
    };
    Ok(match hash {
        BindingHash::Sha224 => Sha224::digest(cert_der).to_vec(),
        BindingHash::Sha256 => Sha256::digest(cert_der).to_vec(),
        BindingHash::Sha384 => Sha384::digest(cert_der).to_vec(),
        BindingHash::Sha512 => Sha512::digest(cert_der).to_vec(),
    })
}

/// How pgtether treats TLS from its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ClientTls {
    /// Refuse TLS (SSLRequest answered 'N').
    Disable,
    /// TLS when the client asks for it (needs a certificate).
    #[default]
    Allow,
    /// Only TLS: a plaintext client is refused with 28000.
    Require,
}

/// libpq's sslmode, for pgtether's connections to a database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    Disable,
    /// TLS if the server offers it, unverified.
    #[default]
    Prefer,
    /// TLS or nothing, unverified.
    Require,
    /// TLS with a certificate chain to `sslrootcert`, any host name.
    VerifyCa,
    /// TLS with a certificate chain to `sslrootcert` naming the host.
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        path: path.display().to_string(),
        detail: e.to_string(),
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Read {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server side of client connections: certificate chain and key (PEM), and the channel
/// binding data of the chain's first (leaf) certificate, the one rustls presents.
pub fn server_config(cert: &Path, key: &Path) -> Result<ServerTls, TlsError> {
    let chain = certificates(cert)?;
    let channel_binding = tls_server_end_point(&chain[0]).map(Arc::from);
    let key_pem = read(key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Read {
        path: key.display().to_string(),
        detail: e.to_string(),
    })?;
    // TLS 1.2 and 1.3 only (rustls has nothing older).
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(ServerTls {
        config: Arc::new(config),
        channel_binding,
    })
}

/// How connections to one database check the server, by `sslmode` and `sslrootcert`.
pub fn client_config(
    mode: SslMode,
    root: Option<&Path>,
) -> Result<Option<Arc<rustls::ClientConfig>>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let config = match mode {
        SslMode::Disable => return Ok(None),
        SslMode::Prefer | SslMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider())))
            .with_no_client_auth(),
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let mut roots = RootCertStore::empty();
            if let Some(root) = root {
                for cert in certificates(root)? {
                    roots.add(cert)?;
                }
            }
            let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
            if mode == SslMode::VerifyCa {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnly(verifier)))
                    .with_no_client_auth()
            } else {
                builder.with_webpki_verifier(verifier).with_no_client_auth()
            }
        }
    };
    Ok(Some(Arc::new(config)))
}

/// The name a server certificate is checked against.
pub fn server_name(host: &str) -> Option<ServerName<'static>> {
    ServerName::try_from(host.to_string()).ok()
}

/// sslmode prefer/require: encrypted, not authenticated (as libpq).
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// sslmode verify-ca: the chain must lead to a trusted root; the host name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            r => r,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

    #[test]
    fn verify_full_accepts_a_chain_to_the_configured_root() {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "ca");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let leaf = params.signed_by(&key, &ca, &ca_key).unwrap();
        let dir = std::env::temp_dir().join(format!("pgtether-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_path = dir.join("ca.pem");
        std::fs::write(&ca_path, ca.pem()).unwrap();
        let mut roots = RootCertStore::empty();
        for c in certificates(&ca_path).unwrap() {
            roots.add(c).unwrap();
        }
        let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .unwrap();
        let r = v.verify_server_cert(
            leaf.der(),
            &[],
            &server_name("127.0.0.1").unwrap(),
            &[],
            UnixTime::now(),
        );
        let _ = std::fs::remove_dir_all(&dir);
        assert!(r.is_ok(), "{r:?}");
    }

    /// A self-signed certificate for `key`, in DER.
    fn self_signed(key: &KeyPair) -> Vec<u8> {
        let params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.self_signed(key).unwrap().der().to_vec()
    }

    /// ring cannot generate RSA keys; openssl (installed with PostgreSQL) can.
    fn rsa_key() -> KeyPair {
        let out = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ])
            .output()
            .expect("openssl runs");
        assert!(out.status.success(), "{out:?}");
        let pem = String::from_utf8(out.stdout).unwrap();
        KeyPair::from_pem_and_sign_algo(&pem, &rcgen::PKCS_RSA_SHA256).unwrap()
    }

    #[test]
    fn channel_binding_hashes_the_certificate_with_its_signature_hash() {
        // RSA with SHA-256 and ECDSA P-256 with SHA-256: SHA-256 of the DER.
        for key in [
            rsa_key(),
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        ] {
            let der = self_signed(&key);
            let data = tls_server_end_point(&der).unwrap();
            assert_eq!(data, Sha256::digest(&der).to_vec());
        }
        // ECDSA P-384 with SHA-384: the signature's own hash.
        let der = self_signed(&KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap());
        assert_eq!(
            tls_server_end_point(&der).unwrap(),
            Sha384::digest(&der).to_vec()
        );
        // Ed25519 has no separate hash: RFC 5929 defines nothing, PLUS is not offered.
        let der = self_signed(&KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap());
        assert!(matches!(
            tls_server_end_point(&der),
            Err(BindingError::NoHash(_))
        ));
        assert!(matches!(
            tls_server_end_point(b"not a certificate"),
            Err(BindingError::Unparsable(_))
        ));
    }

    #[test]
    fn server_config_keeps_the_leaf_binding() {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let dir = std::env::temp_dir().join(format!("pgtether-tls-cb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        let tls = server_config(&cert_path, &key_path);
        let _ = std::fs::remove_dir_all(&dir);
        let tls = tls.unwrap();
        assert_eq!(
            tls.channel_binding.unwrap().to_vec(),
            Sha256::digest(cert.der()).to_vec()
        );
    }
}
