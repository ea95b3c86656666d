//! TLS to Postgres, as `sslmode` and `sslrootcert` in `database.url` ask.
//!
//! tokio-postgres parses `sslmode` but knows only `disable`, `prefer` and
//! `require`, leaves every certificate decision to the TLS connector, and
//! refuses `sslrootcert` as an unknown option. So the URL is read here first:
//! the two keys are taken out, the rest goes to tokio-postgres, and a rustls
//! connector (tokio-postgres-rustls, the aws-lc-rs provider the rest of the
//! workspace uses) checks what libpq checks for that mode:
//!
//! | sslmode | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` (default) | when the server offers it | not checked, unless `sslrootcert` names a file (then as `verify-ca`) |
//! | `require` | always | as `prefer` |
//! | `verify-ca` | always | signed by a CA in `sslrootcert`, or in the system's CA certificates without it |
//! | `verify-full` | always | as `verify-ca`, and issued for `host` |
//!
//! `sslrootcert=system` names the system's CA certificates and, as in libpq,
//! is refused below `verify-full`: a public CA signs certificates for anyone,
//! so a chain to one proves nothing without the name. With `hostaddr`,
//! tokio-postgres connects to that address and `host` is still the name
//! checked, which is how a certificate is checked when its name does not
//! resolve. libpq's `allow` (plain first) has no tokio-postgres equivalent
//! and is refused rather than silently made stricter or weaker.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres_rustls::MakeRustlsConnect;

/// Where `database.url` is named in messages.
const URL_KEY: &str = "database.url (env DATABASE_URL)";

/// A `database.url` that cannot be used as written, naming what to change.
/// Causes are sources, not part of the message: `{:#}` prints the chain.
#[derive(Debug, thiserror::Error)]
pub enum DatabaseUrlError {
    #[error("{URL_KEY} is not valid")]
    Invalid(#[source] tokio_postgres::Error),
    #[error(
        "{URL_KEY}: sslmode={0} is not supported; use disable, prefer, require, verify-ca or verify-full"
    )]
    SslMode(String),
    #[error(
        "{URL_KEY}: sslrootcert=system needs sslmode=verify-full (it is sslmode={0}): a public CA \
         signs certificates for any name, so only the name check makes the chain mean something"
    )]
    SystemRootsNeedVerifyFull(SslMode),
    #[error("{URL_KEY}: cannot read sslrootcert {path}")]
    RootCert {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{URL_KEY}: sslrootcert {path} holds no usable CA certificate{reason}")]
    NoRootCert { path: PathBuf, reason: String },
    #[error(
        "{URL_KEY}: sslmode={0} checks the server's certificate against the system's CA \
         certificates (no sslrootcert is given), but none were found: install ca-certificates \
         or set sslrootcert to the CA's PEM file"
    )]
    NoSystemRoots(SslMode),
    #[error("TLS to Postgres cannot be set up")]
    Rustls(#[from] rustls::Error),
}

/// libpq's `sslmode` values that Tollgate honours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<Self, DatabaseUrlError> {
        Ok(match value {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => return Err(DatabaseUrlError::SslMode(other.to_owned())),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the CA certificates that sign the server's certificate come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Roots {
    File(PathBuf),
    System,
}

/// How much of the server's certificate is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Check {
    /// Nothing: the session is encrypted, the server not authenticated.
    Nothing,
    /// Signed by one of the roots.
    Chain(Roots),
    /// Signed by one of the roots and issued for the host name.
    ChainAndName(Roots),
}

impl Check {
    fn for_mode(mode: SslMode, root_cert: Option<&str>) -> Result<Self, DatabaseUrlError> {
        let roots = match root_cert {
            None => None,
            Some("system") => Some(Roots::System),
            Some(path) => Some(Roots::File(PathBuf::from(path))),
        };
        Ok(match (mode, roots) {
            (SslMode::Disable, _) => Self::Nothing,
            (SslMode::Prefer | SslMode::Require | SslMode::VerifyCa, Some(Roots::System)) => {
                return Err(DatabaseUrlError::SystemRootsNeedVerifyFull(mode));
            }
            (SslMode::Prefer | SslMode::Require, None) => Self::Nothing,
            // libpq: "if a root CA file exists, the behavior of
            // sslmode=require will be the same as that of verify-ca".
            (SslMode::Prefer | SslMode::Require, Some(file)) => Self::Chain(file),
            (SslMode::VerifyCa, roots) => Self::Chain(roots.unwrap_or(Roots::System)),
            (SslMode::VerifyFull, roots) => Self::ChainAndName(roots.unwrap_or(Roots::System)),
        })
    }

    /// What the check demands, for handshake errors.
    fn describe(&self, mode: SslMode) -> String {
        let roots = |roots: &Roots| match roots {
            Roots::File(path) => format!("sslrootcert {}", path.display()),
            Roots::System => "the system's CA certificates".to_owned(),
        };
        match self {
            Self::Nothing => format!("sslmode={mode}: the server's certificate is not checked"),
            Self::Chain(r) => format!(
                "sslmode={mode}: the server's certificate must be signed by a CA in {}",
                roots(r)
            ),
            Self::ChainAndName(r) => format!(
                "sslmode={mode}: the server's certificate must be signed by a CA in {} and be \
                 issued for the host name",
                roots(r)
            ),
        }
    }

    fn load(
        self,
        mode: SslMode,
        provider: &CryptoProvider,
    ) -> Result<CertificateCheck, DatabaseUrlError> {
        let (roots, check_name) = match self {
            Self::Nothing => (None, false),
            Self::Chain(roots) => (Some(roots), false),
            Self::ChainAndName(roots) => (Some(roots), true),
        };
        let roots = match roots {
            None => None,
            Some(Roots::File(path)) => Some(root_file(path)?),
            Some(Roots::System) => Some(system_roots(mode)?),
        };
        Ok(CertificateCheck {
            roots: roots.map(Arc::new),
            check_name,
            algorithms: provider.signature_verification_algorithms,
        })
    }
}

fn root_file(path: PathBuf) -> Result<RootCertStore, DatabaseUrlError> {
    let certificates = CertificateDer::pem_file_iter(&path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|source| DatabaseUrlError::RootCert {
            path: path.clone(),
            source,
        })?;
    let mut store = RootCertStore::empty();
    let (_, unusable) = store.add_parsable_certificates(certificates);
    if store.is_empty() {
        let reason = if unusable > 0 {
            format!(" ({unusable} certificate(s) could not be parsed)")
        } else {
            " (no PEM CERTIFICATE block)".to_owned()
        };
        return Err(DatabaseUrlError::NoRootCert { path, reason });
    }
    Ok(store)
}

fn system_roots(mode: SslMode) -> Result<RootCertStore, DatabaseUrlError> {
    // Errors for single unreadable files are not fatal: the store holds
    // whatever could be read, and an empty store is reported below.
    let found = rustls_native_certs::load_native_certs();
    let mut store = RootCertStore::empty();
    store.add_parsable_certificates(found.certs);
    if store.is_empty() {
        return Err(DatabaseUrlError::NoSystemRoots(mode));
    }
    Ok(store)
}

/// `database.url` made ready to connect: the tokio-postgres config, and the
/// TLS connector carrying the certificate check that `sslmode` asked for.
pub struct PostgresTarget {
    pub config: tokio_postgres::Config,
    pub tls: PostgresTls,
}

impl PostgresTarget {
    pub fn parse(url: &str) -> Result<Self, DatabaseUrlError> {
        let split = TlsParams::split(url);
        let mut config: tokio_postgres::Config =
            split.rest.parse().map_err(DatabaseUrlError::Invalid)?;
        let mode = match split.ssl_mode.as_deref() {
            None => SslMode::Prefer,
            Some(value) => SslMode::parse(value)?,
        };
        config.ssl_mode(match mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        });
        let check = Check::for_mode(mode, split.root_cert.as_deref())?;
        let policy = Arc::from(check.describe(mode));
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = check.load(mode, &provider)?;
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        Ok(Self {
            config,
            tls: PostgresTls {
                inner: MakeRustlsConnect::new(client),
                policy,
            },
        })
    }
}

/// `database.url` split into what tokio-postgres parses and the two TLS keys
/// it cannot take (`sslmode` it takes, but not all of libpq's values).
#[derive(Debug, PartialEq, Eq)]
struct TlsParams {
    rest: String,
    ssl_mode: Option<String>,
    root_cert: Option<String>,
}

impl TlsParams {
    /// The keys are query parameters of the `postgres://` URL (the only form
    /// the config accepts). Anything else is passed on whole, so
    /// tokio-postgres reports what is wrong with it.
    fn split(url: &str) -> Self {
        let mut split = Self {
            rest: url.to_owned(),
            ssl_mode: None,
            root_cert: None,
        };
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return split;
        }
        // The query starts where tokio-postgres finds it: at the first `?`
        // after the credentials, which end at the first `@`.
        let after_credentials = url.find('@').map_or(0, |at| at + 1);
        let Some(query_at) = url[after_credentials..]
            .find('?')
            .map(|at| at + after_credentials)
        else {
            return split;
        };
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let mut kept = Vec::new();
        for pair in url[query_at + 1..].split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match decode(key).as_str() {
                "sslmode" => split.ssl_mode = Some(decode(value)),
                "sslrootcert" => split.root_cert = Some(decode(value)),
                _ => kept.push(pair),
            }
        }
        split.rest = url[..query_at].to_owned();
        if !kept.is_empty() {
            split.rest.push('?');
            split.rest.push_str(&kept.join("&"));
        }
        split
    }
}

/// The server certificate check of one `sslmode`. Handshake signatures are
/// always verified, so even unchecked certificates belong to the server that
/// sent them (channel binding relies on that).
#[derive(Debug)]
struct CertificateCheck {
    /// `None`: any certificate is accepted.
    roots: Option<Arc<RootCertStore>>,
    check_name: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for CertificateCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else {
            return Ok(ServerCertVerified::assertion());
        };
        let certificate = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &certificate,
            roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        if self.check_name {
            verify_server_name(&certificate, server_name)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// tokio-postgres-rustls's connector, with handshake failures saying what
/// `sslmode` demanded of the certificate: "invalid peer certificate:
/// UnknownIssuer" alone does not tell an operator which file to fix.
#[derive(Clone)]
pub struct PostgresTls {
    inner: MakeRustlsConnect,
    policy: Arc<str>,
}

impl<S> MakeTlsConnect<S> for PostgresTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = <MakeRustlsConnect as MakeTlsConnect<S>>::Stream;
    type TlsConnect = PostgresTlsConnect<<MakeRustlsConnect as MakeTlsConnect<S>>::TlsConnect>;
    type Error = <MakeRustlsConnect as MakeTlsConnect<S>>::Error;

    fn make_tls_connect(&mut self, host: &str) -> Result<Self::TlsConnect, Self::Error> {
        Ok(PostgresTlsConnect {
            inner: MakeTlsConnect::<S>::make_tls_connect(&mut self.inner, host)?,
            policy: Arc::clone(&self.policy),
        })
    }
}

/// One handshake of [`PostgresTls`].
pub struct PostgresTlsConnect<T> {
    inner: T,
    policy: Arc<str>,
}

/// A failed TLS handshake with Postgres and what `sslmode` demanded.
#[derive(Debug, thiserror::Error)]
#[error("{message} ({policy})")]
pub struct HandshakeError {
    message: String,
    policy: Arc<str>,
}

type Handshake<S> = Pin<Box<dyn Future<Output = Result<S, HandshakeError>> + Send>>;

impl<S, T> TlsConnect<S> for PostgresTlsConnect<T>
where
    T: TlsConnect<S>,
    T::Future: Send + 'static,
{
    type Stream = T::Stream;
    type Error = HandshakeError;
    type Future = Handshake<T::Stream>;

    fn connect(self, stream: S) -> Self::Future {
        let (handshake, policy) = (self.inner.connect(stream), self.policy);
        Box::pin(async move {
            handshake.await.map_err(|e| HandshakeError {
                message: e.into().to_string(),
                policy,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(url: &str) -> (String, Option<String>, Option<String>) {
        let s = TlsParams::split(url);
        (s.rest, s.ssl_mode, s.root_cert)
    }

    #[test]
    fn url_form_loses_only_the_tls_keys() {
        assert_eq!(
            split(
                "postgres://u:p@h:5432/db?sslmode=verify-full&application_name=x&sslrootcert=%2Fca%20dir%2Froot.pem"
            ),
            (
                "postgres://u:p@h:5432/db?application_name=x".to_owned(),
                Some("verify-full".to_owned()),
                Some("/ca dir/root.pem".to_owned())
            )
        );
        assert_eq!(
            split("postgresql://h/db?sslmode=require"),
            (
                "postgresql://h/db".to_owned(),
                Some("require".to_owned()),
                None
            )
        );
        assert_eq!(
            split("postgres://h/db"),
            ("postgres://h/db".to_owned(), None, None)
        );
    }

    #[test]
    fn a_question_mark_in_the_password_is_not_the_query() {
        assert_eq!(
            split("postgres://u:pa?ss@h/db?sslmode=disable"),
            (
                "postgres://u:pa?ss@h/db".to_owned(),
                Some("disable".to_owned()),
                None
            )
        );
    }

    #[test]
    fn other_forms_reach_tokio_postgres_whole() {
        let text = "host=h sslrootcert=/ca.pem";
        assert_eq!(split(text), (text.to_owned(), None, None));
        assert!(matches!(
            PostgresTarget::parse(text),
            Err(DatabaseUrlError::Invalid(_))
        ));
    }

    #[test]
    fn modes_map_to_what_tokio_postgres_negotiates() {
        use tokio_postgres::config::SslMode as Pg;
        for (query, expected) in [
            ("", Pg::Prefer),
            ("?sslmode=disable", Pg::Disable),
            ("?sslmode=prefer", Pg::Prefer),
            ("?sslmode=require", Pg::Require),
            ("?sslmode=verify-full", Pg::Require),
        ] {
            let target = PostgresTarget::parse(&format!("postgres://h/db{query}")).unwrap();
            assert_eq!(target.config.get_ssl_mode(), expected, "{query}");
        }
    }

    #[test]
    fn checks_follow_libpq() {
        let file = Some("/ca.pem");
        let file_roots = || Roots::File(PathBuf::from("/ca.pem"));
        let check = |mode, root| Check::for_mode(mode, root).ok();
        assert_eq!(check(SslMode::Require, None), Some(Check::Nothing));
        assert_eq!(check(SslMode::Prefer, None), Some(Check::Nothing));
        // A root file makes require (and prefer) check the chain, as libpq does.
        assert_eq!(
            check(SslMode::Require, file),
            Some(Check::Chain(file_roots()))
        );
        assert_eq!(
            check(SslMode::VerifyCa, file),
            Some(Check::Chain(file_roots()))
        );
        assert_eq!(
            check(SslMode::VerifyCa, None),
            Some(Check::Chain(Roots::System))
        );
        assert_eq!(
            check(SslMode::VerifyFull, None),
            Some(Check::ChainAndName(Roots::System))
        );
        assert_eq!(
            check(SslMode::VerifyFull, Some("system")),
            Some(Check::ChainAndName(Roots::System))
        );
        assert_eq!(
            check(SslMode::VerifyFull, file),
            Some(Check::ChainAndName(file_roots()))
        );
        for weak in [SslMode::Prefer, SslMode::Require, SslMode::VerifyCa] {
            assert!(matches!(
                Check::for_mode(weak, Some("system")),
                Err(DatabaseUrlError::SystemRootsNeedVerifyFull(_))
            ));
        }
    }

    #[test]
    fn unknown_modes_and_missing_root_files_are_refused_with_the_key() {
        let e = PostgresTarget::parse("postgres://h/db?sslmode=allow")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("sslmode=allow is not supported"), "{e}");
        let e = PostgresTarget::parse(
            "postgres://h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains(
                "database.url (env DATABASE_URL): cannot read sslrootcert /nonexistent/ca.pem"
            ),
            "{e}"
        );
    }

    #[test]
    fn a_root_file_without_certificates_is_refused() {
        let path =
            std::env::temp_dir().join(format!("tollgate-empty-ca-{}.pem", std::process::id()));
        std::fs::write(&path, "not a certificate\n").unwrap();
        let url = format!(
            "postgres://h/db?sslmode=verify-ca&sslrootcert={}",
            path.display()
        );
        let e = PostgresTarget::parse(&url).err().unwrap().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(e.contains("holds no usable CA certificate"), "{e}");
    }
}
