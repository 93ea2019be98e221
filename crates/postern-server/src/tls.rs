//! TLS for the server side: a rustls configuration from PEM files.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::PrivateKeyDer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use crate::error::StartError;

/// Loads a certificate chain and its private key (PEM) into a rustls server configuration
/// (TLS 1.2 and 1.3, rustls' safe defaults, ring as the crypto provider). Warns (see
/// [`certificate_warnings`]) about a certificate that is out of date or does not name
/// `hostname` (when given). The returned [`ServerCert`] reads the files again on demand (SIGHUP).
pub fn server_config(
    cert: &Path,
    key: &Path,
    hostname: Option<&str>,
) -> Result<(Arc<ServerConfig>, Arc<ServerCert>), StartError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let current = load(cert, key, hostname, &provider, true)?;
    let resolver = Arc::new(ServerCert {
        cert: cert.to_owned(),
        key: key.to_owned(),
        hostname: hostname.map(str::to_owned),
        provider: provider.clone(),
        current: RwLock::new(Arc::new(current)),
    });
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StartError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    Ok((Arc::new(config), resolver))
}

/// Whether the certificate chain and key load and go together, without a word of warning:
/// checked before anything else changes at start-up (the spool), so that a start that
/// fails on them has changed nothing.
pub fn check_pair(cert: &Path, key: &Path) -> Result<(), StartError> {
    let provider = rustls::crypto::ring::default_provider();
    load(cert, key, None, &provider, false).map(|_| ())
}

/// The server's certificate chain and key, shared by every core's handshakes; [`reload`]
/// (on SIGHUP) puts a renewed pair in place for the handshakes that follow.
///
/// [`reload`]: ServerCert::reload
#[derive(Debug)]
pub struct ServerCert {
    cert: PathBuf,
    key: PathBuf,
    hostname: Option<String>,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ServerCert {
    /// Reads the certificate and key files again. When they cannot work, the error names them
    /// and the pair in use stays.
    pub fn reload(&self) -> Result<(), StartError> {
        let renewed = load(
            &self.cert,
            &self.key,
            self.hostname.as_deref(),
            &self.provider,
            true,
        )?;
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        // A chain file caught half-written between two blocks reads as a shorter chain whose
        // key still matches: taken (a renewal may change the chain), but said.
        let (was, now) = (current.cert.len(), renewed.cert.len());
        if now < was {
            tracing::warn!(
                "{}: the chain read again has {now} certificate(s), the one in use had {was} \
                 (a file still being written?); new handshakes use it",
                self.cert.display()
            );
        }
        *current = Arc::new(renewed);
        Ok(())
    }

    /// The certificate file.
    pub fn cert_path(&self) -> &Path {
        &self.cert
    }
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}

/// Reads a certificate chain and its key (PEM) and checks that they belong together.
fn load(
    cert: &Path,
    key: &Path,
    hostname: Option<&str>,
    provider: &CryptoProvider,
    warn: bool,
) -> Result<CertifiedKey, StartError> {
    // Each file is named with the flag that gave it (`--tls-cert x.pem: ...`): one file given
    // to both flags, say, then shows which of them failed.
    let bad = |flag: &str, path: &Path, why: String| {
        StartError::Tls(format!("{flag} {}: {why}", path.display()))
    };
    let mut reader =
        BufReader::new(File::open(cert).map_err(|e| bad("--tls-cert", cert, e.to_string()))?);
    let certs = rustls_pemfile::certs(&mut reader)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("--tls-cert", cert, pem_error(&e)))?;
    if certs.is_empty() {
        return Err(bad("--tls-cert", cert, "no certificate found".into()));
    }
    // The first is read with the key below; the chain after it only goes out in handshakes,
    // where one that does not parse fails every client's, those that verify nothing too.
    for (i, c) in certs.iter().enumerate().skip(1) {
        if let Err(e) = x509_parser::parse_x509_certificate(c) {
            return Err(bad(
                "--tls-cert",
                cert,
                format!(
                    "certificate {} of {} in the file cannot be read ({e}): the chain after \
                     the server's own certificate is damaged",
                    i + 1,
                    certs.len()
                ),
            ));
        }
    }
    let key_pem = std::fs::read(key).map_err(|e| bad("--tls-key", key, e.to_string()))?;
    if encrypted_key(&key_pem) {
        return Err(bad(
            "--tls-key",
            key,
            "the private key is encrypted; postern needs it unencrypted (for example \
             `openssl pkey -in KEY -out KEY.plain`, then keep that file private)"
                .into(),
        ));
    }
    let mut keys = private_keys(&key_pem).map_err(|e| bad("--tls-key", key, pem_error(&e)))?;
    if keys.is_empty() {
        return Err(bad(
            "--tls-key",
            key,
            "no private key found (PEM, PKCS#1, PKCS#8 or SEC1)".into(),
        ));
    }
    // A file with several keys (a renewal's new key beside the old, say): the one of the
    // certificate is used, said at start; with none of them its, the first is tried below
    // and the mismatch said with the count.
    let several = keys.len();
    let chosen = (several > 1)
        .then(|| {
            keys.iter().position(|k| {
                // (`from_der` checks that the key is the certificate's.)
                CertifiedKey::from_der(certs.clone(), k.clone_key(), provider).is_ok()
            })
        })
        .flatten();
    let key_der = keys.swap_remove(chosen.unwrap_or(0));
    let key_warning = open_key_warning(key);
    if let Some(i) = chosen.filter(|_| warn) {
        tracing::warn!(
            "--tls-key {}: the file holds {several} private keys; the one of the certificate \
             (key {} of {several}) is used",
            key.display(),
            i + 1
        );
    }
    let key_count_note = if several > 1 && chosen.is_none() {
        format!(" (the file holds {several} private keys, none of them the certificate's)")
    } else {
        String::new()
    };
    let warnings = certificate_warnings(&certs[0], hostname, unix_now());
    let claimed_kind = key_kind(&key_der);
    let certified = CertifiedKey::from_der(certs, key_der, provider).map_err(|e| {
        // The advice fits the failure: a key of a kind rustls does not sign with (Ed448, DSA)
        // or a certificate that does not parse is not a mismatch.
        let why = match e {
            rustls::Error::InconsistentKeys(_) => format!(
                "the key does not match the certificate{key_count_note}; the key must be the \
                 one of the first certificate in the file (the server's own, followed by its \
                 chain)"
            ),
            rustls::Error::General(ref m) if m.contains("failed to parse private key") => {
                match claimed_kind {
                    // A kind that is signed with, yet unreadable: the file is damaged, or
                    // (ECDSA) the curve is not one of those.
                    Some(kind) => format!(
                        "the {kind} key cannot be read: {}",
                        match kind {
                            "RSA" =>
                                "it is damaged, or of a size that cannot be used (2048 to \
                                      8192 bits)",
                            "ECDSA" =>
                                "it is damaged, or on a curve that cannot be used (use \
                                        P-256 or P-384)",
                            _ => "it is damaged",
                        }
                    ),
                    None => "the key is of a kind that cannot be used (use RSA, ECDSA \
                             P-256/P-384, or Ed25519)"
                        .to_owned(),
                }
            }
            rustls::Error::InvalidCertificate(ref c) => {
                format!("the certificate cannot be read ({c:?}): check the PEM file")
            }
            e => e.to_string(),
        };
        StartError::Tls(format!(
            "--tls-cert {} and --tls-key {}: {why}",
            cert.display(),
            key.display()
        ))
    })?;
    if warn {
        if let Some(warning) = key_warning {
            tracing::warn!("{warning}");
        }
        for warning in warnings {
            tracing::warn!("{}: {warning}", cert.display());
        }
    }
    Ok(certified)
}

/// Every private key in a PEM file (PKCS#1, PKCS#8 or SEC1), in order.
fn private_keys(pem: &[u8]) -> std::io::Result<Vec<PrivateKeyDer<'static>>> {
    use rustls_pemfile::Item;
    let mut keys = Vec::new();
    for item in rustls_pemfile::read_all(&mut &pem[..]) {
        match item? {
            Item::Pkcs1Key(k) => keys.push(PrivateKeyDer::Pkcs1(k)),
            Item::Pkcs8Key(k) => keys.push(PrivateKeyDer::Pkcs8(k)),
            Item::Sec1Key(k) => keys.push(PrivateKeyDer::Sec1(k)),
            _ => {}
        }
    }
    Ok(keys)
}

/// What to say of a private key file that users other than its owner and group can read or
/// replace (its mode's bits for others, where every directory on the way lets others through
/// to it); None for one kept closed. The key is still used: postern reads it as the user it
/// runs as, and a key refused here would stop all TLS.
fn open_key_warning(key: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let key = std::fs::canonicalize(key).ok()?;
    let mode = std::fs::metadata(&key).ok()?.permissions().mode();
    if mode & 0o006 == 0 {
        return None;
    }
    // A directory on the way that others cannot pass (no o+x) closes the key to them.
    let reachable = key
        .ancestors()
        .skip(1)
        .all(|dir| std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o001 != 0));
    if !reachable {
        return None;
    }
    let what = if mode & 0o002 != 0 {
        "can be replaced by any user of this machine"
    } else {
        "can be read by any user of this machine"
    };
    Some(format!(
        "the private key {} {what} (mode {:o}): let only the user postern runs as read it \
         (its owner, mode 600), or a group of its own (mode 640)",
        key.display(),
        mode & 0o7777
    ))
}

/// Whether a key file holds an encrypted key: PKCS#8 `BEGIN ENCRYPTED PRIVATE KEY`, or a
/// legacy PEM block with the header `Proc-Type: 4,ENCRYPTED`. Only those lines count: the
/// word in a comment around the block is no sign of one.
fn encrypted_key(pem: &[u8]) -> bool {
    pem.split(|&b| b == b'\n').any(|line| {
        let line = line.trim_ascii();
        line.starts_with(b"-----BEGIN ENCRYPTED ")
            || (line.starts_with(b"Proc-Type:") && line.ends_with(b"ENCRYPTED"))
    })
}

/// A PEM file's error in words: rustls-pemfile names a damaged block's base64 by the
/// decoder's own error (`InvalidCharacter(35)`).
fn pem_error(e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::InvalidData {
        format!("a PEM block is damaged: its content is not base64 ({e})")
    } else {
        e.to_string()
    }
}

/// The kind of key a private key says it is, when it is one that is signed with: from its
/// PEM label (PKCS#1 is RSA, SEC1 is EC), or from the algorithm named at the start of a
/// PKCS#8 key.
fn key_kind(key: &PrivateKeyDer<'_>) -> Option<&'static str> {
    // DER object identifiers with their tag and length: rsaEncryption, id-ecPublicKey and
    // id-Ed25519.
    const KINDS: [(&[u8], &str); 3] = [
        (b"\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x01\x01", "RSA"),
        (b"\x06\x07\x2a\x86\x48\xce\x3d\x02\x01", "ECDSA"),
        (b"\x06\x03\x2b\x65\x70", "Ed25519"),
    ];
    match key {
        PrivateKeyDer::Pkcs1(_) => Some("RSA"),
        PrivateKeyDer::Sec1(_) => Some("ECDSA"),
        PrivateKeyDer::Pkcs8(der) => {
            // The algorithm identifier comes after the outer header and the version: well
            // inside the first 32 octets.
            let head = &der.secret_pkcs8_der()[..der.secret_pkcs8_der().len().min(32)];
            KINDS
                .iter()
                .find(|(oid, _)| head.windows(oid.len()).any(|w| w == *oid))
                .map(|(_, kind)| *kind)
        }
        _ => None,
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Within this many seconds of its end a certificate is said to expire soon.
const EXPIRES_SOON: i64 = 14 * 86_400;

/// What an operator should hear about the server's own certificate (DER) at `now` (Unix
/// seconds): expired, not valid yet, expiring within two weeks, or not naming `hostname` (when
/// given).
/// The certificate is still used: clients that deliver opportunistically do not check it, and
/// refusing to start would stop all mail instead of only the verifying clients' TLS.
pub fn certificate_warnings(der: &[u8], hostname: Option<&str>, now: i64) -> Vec<String> {
    let cert = match x509_parser::parse_x509_certificate(der) {
        Ok((_, cert)) => cert,
        Err(e) => {
            return vec![format!(
                "the certificate could not be read for its dates: {e}"
            )]
        }
    };
    let mut warnings = Vec::new();
    let validity = cert.validity();
    let (from, until) = (validity.not_before, validity.not_after);
    if until.timestamp() < now {
        warnings.push(format!(
            "the certificate expired on {until}; clients that verify it will refuse TLS \
             (renew it)"
        ));
    } else if from.timestamp() > now {
        warnings.push(format!(
            "the certificate is not valid before {from}; clients that verify it will refuse \
             TLS until then (is the clock right?)"
        ));
    } else if until.timestamp() - now < EXPIRES_SOON {
        let left = until.timestamp() - now;
        let when = match (left / 86_400, left / 3600) {
            (0, 0) => "in less than an hour".to_owned(),
            (0, 1) => "in 1 hour".to_owned(),
            (0, hours) => format!("in {hours} hours"),
            (1, _) => "in 1 day".to_owned(),
            (days, _) => format!("in {days} days"),
        };
        warnings.push(format!(
            "the certificate expires on {until}, {when} (renew it)"
        ));
    }
    // `openssl req -x509` marks what it makes an authority unless told otherwise: webpki
    // (rustls, postern's own --outbound-tls required among them) refuses such a certificate
    // as a server's own, whatever it names.
    if let Ok(Some(bc)) = cert.basic_constraints() {
        if bc.value.ca {
            warnings.push(
                "the certificate is marked as a certificate authority's (basicConstraints \
                 CA:TRUE, what `openssl req -x509` makes unless told otherwise); clients that \
                 verify it (rustls among them) refuse it as a server's own (make it with \
                 `-addext basicConstraints=critical,CA:FALSE`, or have a CA issue it)"
                    .to_owned(),
            );
        }
    }
    let Some(hostname) = hostname else {
        return warnings;
    };
    // An address literal is named by an IP address in subjectAltName (RFC 9525 6.2).
    if let Some(literal) = hostname.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        let text = literal
            .get(..5)
            .filter(|tag| tag.eq_ignore_ascii_case("IPv6:"))
            .map_or(literal, |_| &literal[5..]);
        if let Ok(ip) = text.parse::<std::net::IpAddr>() {
            let addresses: Vec<std::net::IpAddr> = match cert.subject_alternative_name() {
                Ok(Some(san)) => san
                    .value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                            4 => <[u8; 4]>::try_from(*b).ok().map(std::net::IpAddr::from),
                            16 => <[u8; 16]>::try_from(*b).ok().map(std::net::IpAddr::from),
                            _ => None,
                        },
                        _ => None,
                    })
                    .collect(),
                _ => Vec::new(),
            };
            if !addresses.contains(&ip) {
                let named: Vec<String> = addresses.iter().map(ToString::to_string).collect();
                warnings.push(format!(
                    "the certificate does not name --hostname {hostname} (it names {}); \
                     clients that verify the address will refuse TLS",
                    if named.is_empty() {
                        "no IP address".to_owned()
                    } else {
                        named.join(", ")
                    }
                ));
            }
            return warnings;
        }
    }
    let names: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let from_cn = names.is_empty();
    let names = if from_cn {
        // No DNS names in subjectAltName: the subject's common name, as older clients read it.
        cert.subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
            .collect()
    } else {
        names
    };
    let named = names.iter().any(|n| name_matches(n, hostname));
    if named && from_cn {
        // RFC 9525 (as RFC 6125 before it for new software) has clients look at
        // subjectAltName only: rustls, Go and browsers refuse such a certificate, postern's
        // own delivery with --outbound-tls required among them.
        warnings.push(format!(
            "the certificate names --hostname {hostname} only in its subject's common name, \
             not in subjectAltName; clients that follow RFC 9525 (rustls, Go, browsers) will \
             refuse TLS (make it with a subjectAltName)"
        ));
    }
    if !named {
        warnings.push(format!(
            "the certificate does not name --hostname {hostname} (it names {}); clients that \
             verify the name will refuse TLS",
            if names.is_empty() {
                "no host".to_owned()
            } else {
                names.join(", ")
            }
        ));
    }
    warnings
}

/// Whether a certificate's DNS name covers `host` (a wildcard covers exactly one label,
/// RFC 6125 6.4.3).
fn name_matches(pattern: &str, host: &str) -> bool {
    let (pattern, host) = (
        pattern.trim_end_matches('.').to_ascii_lowercase(),
        host.trim_end_matches('.').to_ascii_lowercase(),
    );
    match pattern.strip_prefix("*.") {
        Some(rest) => host
            .split_once('.')
            .is_some_and(|(first, tail)| !first.is_empty() && tail == rest),
        None => pattern == host,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const DAY: i64 = 86_400;

    /// A self-signed certificate for `names`, valid from `from` to `until` (Unix seconds).
    fn cert(names: &[&str], from: i64, until: i64) -> Vec<u8> {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        let secs = |t: i64| std::time::Duration::from_secs(u64::try_from(t).unwrap());
        params.not_before = epoch + secs(from);
        params.not_after = epoch + secs(until);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn a_current_certificate_naming_the_host_gives_no_warning() {
        let now = 1_800_000_000;
        let der = cert(&["mx.example.net"], now - DAY, now + 90 * DAY);
        assert_eq!(
            certificate_warnings(&der, Some("mx.example.net"), now),
            Vec::<String>::new()
        );
        assert_eq!(
            certificate_warnings(&der, Some("MX.Example.Net."), now),
            Vec::<String>::new()
        );
    }

    fn one_warning(der: &[u8], host: &str, now: i64) -> String {
        let w = certificate_warnings(der, Some(host), now);
        assert_eq!(w.len(), 1, "{w:?}");
        w.into_iter().next().unwrap()
    }

    #[test]
    fn an_out_of_date_certificate_is_named_with_its_date() {
        let now = 1_800_000_000;
        let expired = cert(&["mx.example.net"], now - 100 * DAY, now - DAY);
        let w = one_warning(&expired, "mx.example.net", now);
        assert!(w.contains("expired on") && w.contains("renew"), "{w}");
        let early = cert(&["mx.example.net"], now + DAY, now + 100 * DAY);
        let w = one_warning(&early, "mx.example.net", now);
        assert!(w.contains("not valid before"), "{w}");
        let soon = cert(&["mx.example.net"], now - 80 * DAY, now + 5 * DAY + 60);
        let w = one_warning(&soon, "mx.example.net", now);
        assert!(w.contains("in 5 days"), "{w}");
        let hours = cert(&["mx.example.net"], now - 80 * DAY, now + 23 * 3600 + 60);
        let w = one_warning(&hours, "mx.example.net", now);
        assert!(w.contains("in 23 hours"), "{w}");
        let later = cert(&["mx.example.net"], now - 80 * DAY, now + 15 * DAY);
        assert_eq!(
            certificate_warnings(&later, Some("mx.example.net"), now),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_certificate_marked_as_an_authority_is_said_so() {
        let now = 1_800_000_000;
        let mut params = rcgen::CertificateParams::new(vec!["mx.example.net".into()]).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        let der = params.self_signed(&key).unwrap().der().to_vec();
        let w = one_warning(&der, "mx.example.net", now);
        assert!(w.contains("CA:TRUE") && w.contains("CA:FALSE"), "{w}");
        // Without a name to check, still said.
        assert_eq!(certificate_warnings(&der, None, now).len(), 1);
        // Marked as no authority: nothing to say.
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        let der = params.self_signed(&key).unwrap().der().to_vec();
        assert_eq!(
            certificate_warnings(&der, Some("mx.example.net"), now),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_certificate_naming_the_host_in_its_common_name_alone_is_said_so() {
        let now = 1_800_000_000;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "mx.example.net");
        let key = rcgen::KeyPair::generate().unwrap();
        let der = params.self_signed(&key).unwrap().der().to_vec();
        let w = one_warning(&der, "mx.example.net", now);
        assert!(w.contains("only in its subject's common name"), "{w}");
    }

    #[test]
    fn a_certificate_for_other_names_is_named_with_the_names_it_has() {
        let now = 1_800_000_000;
        let der = cert(
            &["a.example.net", "b.example.net"],
            now - DAY,
            now + 90 * DAY,
        );
        let w = one_warning(&der, "mx.example.net", now);
        assert!(w.contains("--hostname mx.example.net"), "{w}");
        assert!(w.contains("a.example.net, b.example.net"), "{w}");
    }

    #[test]
    fn an_address_literal_is_named_by_an_ip_address_in_the_certificate() {
        let now = 1_800_000_000;
        let der = cert(
            &["192.0.2.1", "2001:db8::1", "mx.example.net"],
            now - DAY,
            now + 90 * DAY,
        );
        for ours in ["[192.0.2.1]", "[IPv6:2001:db8::1]", "[ipv6:2001:DB8::1]"] {
            assert_eq!(
                certificate_warnings(&der, Some(ours), now),
                Vec::<String>::new(),
                "{ours}"
            );
        }
        let w = one_warning(&der, "[192.0.2.9]", now);
        assert!(w.contains("--hostname [192.0.2.9]"), "{w}");
        assert!(w.contains("192.0.2.1, 2001:db8::1"), "{w}");
    }

    /// Writes `pem` into `dir/name`; returns the path.
    fn file(dir: &Path, name: &str, pem: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    }

    /// A key and a certificate for mx.example.net signed with it, in PEM.
    fn self_signed() -> (rcgen::KeyPair, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["mx.example.net".to_owned()]).unwrap();
        let cert = params.self_signed(&key).unwrap().pem();
        (key, cert)
    }

    fn load_error(cert: &Path, key: &Path) -> String {
        let provider = rustls::crypto::ring::default_provider();
        match load(cert, key, None, &provider, true) {
            Err(StartError::Tls(why)) => why,
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("loaded"),
        }
    }

    #[test]
    fn the_advice_for_a_key_or_certificate_fits_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let (key, pem) = self_signed();
        let good_cert = file(dir.path(), "cert.pem", &pem);
        let other = rcgen::KeyPair::generate().unwrap();
        let other_key = file(dir.path(), "other.pem", &other.serialize_pem());
        let why = load_error(&good_cert, &other_key);
        assert!(why.contains("does not match the certificate"), "{why}");
        // An Ed448 key: PKCS#8, of a kind rustls does not sign with. Not a mismatch.
        let ed448 = file(dir.path(), "ed448.pem", "-----BEGIN PRIVATE KEY-----\nMEcCAQAwBQYDK2VxBDsEOQECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8g\nISIjJCUmJygpKissLS4vMDEyMzQ1Njc4OQ==\n-----END PRIVATE KEY-----\n");
        let why = load_error(&good_cert, &ed448);
        assert!(why.contains("kind that cannot be used"), "{why}");
        assert!(!why.contains("must be the one"), "{why}");
        // Keys of kinds that are signed with, but damaged: named by their kind, not called
        // unusable. An RSA key in PKCS#1 whose numbers are nonsense, a PKCS#8 key that names
        // rsaEncryption around nothing, and a SEC1 (EC) key with nothing in it.
        for (name, pem, kind) in [
            (
                "pkcs1.pem",
                "RSA PRIVATE KEY",
                "MBsCAQACAQMCAQECAQECAQECAQECAQECAQECAQE=",
                "RSA",
            ),
            (
                "pkcs8.pem",
                "PRIVATE KEY",
                "MBkCAQAwDQYJKoZIhvcNAQEBBQAEBTADAgEA",
                "RSA",
            ),
            ("sec1.pem", "EC PRIVATE KEY", "MAoCAQEEBQEBAQEB", "ECDSA"),
        ]
        .map(|(n, label, b64, kind)| {
            let pem = format!("-----BEGIN {label}-----\n{b64}\n-----END {label}-----\n");
            (n, pem, kind)
        }) {
            let why = load_error(&good_cert, &file(dir.path(), name, &pem));
            assert!(
                why.contains(&format!("the {kind} key cannot be read")),
                "{name}: {why}"
            );
        }
        // A certificate whose base64 holds no certificate.
        let garbled = file(
            dir.path(),
            "garbled.pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        let own_key = file(dir.path(), "key.pem", &key.serialize_pem());
        let why = load_error(&garbled, &own_key);
        assert!(why.contains("certificate cannot be read"), "{why}");
        assert!(!why.contains("peer"), "{why}");
    }

    #[test]
    fn of_several_keys_in_a_file_the_certificate_s_is_used() {
        let dir = tempfile::tempdir().unwrap();
        let (key, pem) = self_signed();
        let cert = file(dir.path(), "cert.pem", &pem);
        let (other, third) = (
            rcgen::KeyPair::generate().unwrap(),
            rcgen::KeyPair::generate().unwrap(),
        );
        let provider = rustls::crypto::ring::default_provider();
        // Another key first, the certificate's second: taken.
        let both = format!("{}{}", other.serialize_pem(), key.serialize_pem());
        let keys = file(dir.path(), "both.pem", &both);
        let loaded = load(&cert, &keys, None, &provider, false).unwrap();
        assert!(loaded.keys_match().is_ok());
        // None of them the certificate's: refused, the count said.
        let neither = format!("{}{}", other.serialize_pem(), third.serialize_pem());
        let why = load_error(&cert, &file(dir.path(), "neither.pem", &neither));
        assert!(why.contains("does not match the certificate"), "{why}");
        assert!(why.contains("holds 2 private keys, none of them"), "{why}");
    }

    #[test]
    fn a_damaged_chain_a_comment_and_bad_base64_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let (key, own) = self_signed();
        let own_key = key.serialize_pem();
        let key_file = file(dir.path(), "key.pem", &own_key);
        let provider = rustls::crypto::ring::default_provider();
        // A chain whose second certificate is base64 of no certificate: refused by its place,
        // not taken to fail every handshake later.
        let chain = file(
            dir.path(),
            "chain.pem",
            &format!(
                "{own}-----BEGIN CERTIFICATE-----\nAAECAwQFBgcICQ==\n-----END CERTIFICATE-----\n"
            ),
        );
        let why = load_error(&chain, &key_file);
        assert!(
            why.contains("certificate 2 of 2 in the file cannot be read"),
            "{why}"
        );
        // The word ENCRYPTED in a comment beside a plain key is no encrypted key.
        let commented = file(
            dir.path(),
            "commented.pem",
            &format!("# stored UNENCRYPTED: keep it private\n{own_key}"),
        );
        let cert = file(dir.path(), "cert.pem", &own);
        assert!(load(&cert, &commented, None, &provider, false).is_ok());
        // A PKCS#8 encrypted key and a legacy one with its Proc-Type header still are.
        for (name, pem) in [
            (
                "pkcs8.pem",
                "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
            ),
            (
                "legacy.pem",
                "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n\nAAAA\n-----END RSA PRIVATE KEY-----\n",
            ),
        ] {
            let why = load_error(&cert, &file(dir.path(), name, pem));
            assert!(why.contains("the private key is encrypted"), "{name}: {why}");
        }
        // A character that is not base64 inside a block: said in words.
        let mut lines: Vec<String> = own.lines().map(str::to_owned).collect();
        lines[2].replace_range(4..5, "#");
        let damaged = file(dir.path(), "damaged.pem", &(lines.join("\n") + "\n"));
        let why = load_error(&damaged, &key_file);
        assert!(why.contains("a PEM block is damaged"), "{why}");
    }

    #[test]
    fn a_wildcard_covers_exactly_one_label() {
        assert!(name_matches("*.example.net", "mx.example.net"));
        assert!(name_matches("*.Example.net", "MX.example.net."));
        assert!(!name_matches("*.example.net", "example.net"));
        assert!(!name_matches("*.example.net", "a.mx.example.net"));
        assert!(!name_matches("*.example.net", ".example.net"));
        assert!(!name_matches("mx.example.net", "mx.example.org"));
    }
}
