//! The certificate authorities of a data directory (`<data>/mqtt/`).
//!
//! | file | what |
//! |---|---|
//! | `ca.pem`, `ca.key` | the device CA: signs device certificates, nothing else; the broker trusts it for clients |
//! | `server-ca.pem`, `server-ca.key` | the server CA: signs only the broker's certificate; devices and the pipeline trust it |
//! | `server.pem`, `server.key` | the broker's certificate (names: `localhost`, `127.0.0.1`, and any given) |
//! | `pipeline-ca.pem`, `pipeline-ca.key` | the pipeline CA: signs only pipeline client certificates |
//! | `pipeline.pem`, `pipeline.key` | the pipeline's client certificate (CN `vitaltrail-pipeline`) |
//!
//! Keys are Ed25519, in mode-0600 PKCS#8 PEM files. A **device
//! certificate** carries the device's own `did:key` public key, and its DID
//! as common name (Mosquitto's user name) and URI name. Issuing one
//! needs no secret from the device, and only the holder of the device key
//! can use it. It is issued only for a device the registry holds as
//! active (the caller checks).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ED25519, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};
use vitaltrail_core::DeviceId;

use crate::{Error, PIPELINE_USER, Result};

/// The directory under a data directory that holds the files.
pub const DIR: &str = "mqtt";

/// How long a device certificate is valid.
pub const DEVICE_CERT_DAYS: i64 = 365;

/// The authorities of one data directory, loaded.
pub struct Pki {
    dir: PathBuf,
    ca_pem: String,
    ca_key: KeyPair,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("dir", &self.dir)
            .field("ca_key", &"<redacted>")
            .finish()
    }
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// Write a file atomically: a temporary file of its own (name, process,
/// random), fsync, rename over the target (which replaces a symlink there,
/// never writes through it), fsync of the directory. `secret` files get
/// mode 0600.
pub fn write(path: &Path, text: &str, secret: bool) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(
        ".{name}.{}.{:016x}.tmp",
        std::process::id(),
        rand::random::<u64>()
    ));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)
        .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|_| f.sync_all()))
        .and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        Ok(()) => Ok(()),
        // Some file systems cannot sync a directory; the rename stands.
        Err(e) if matches!(e.raw_os_error(), Some(22) | Some(95)) => Ok(()),
        Err(e) => Err(Error::io(dir, e)),
    }
}

fn validity(p: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(days);
}

fn serial() -> SerialNumber {
    let mut b = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
    b[0] &= 0x7f;
    SerialNumber::from_slice(&b)
}

fn ca_params(name: &str) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.serial_number = Some(serial());
    validity(&mut p, 3650);
    Ok(p)
}

/// Create a CA's two files unless they exist. Only one of them there
/// (say the key was moved offline) is an error: making a new CA would
/// silently invalidate every certificate the old one issued.
fn ensure_ca(dir: &Path, stem: &str, name: &str) -> Result<()> {
    let (pem, key) = (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    );
    match (pem.exists(), key.exists()) {
        (true, true) => return Ok(()),
        (false, false) => {}
        (false, true) => {
            // A crash between writing the key and the certificate: sign
            // the certificate again from the same key (certificates it
            // issued name it by its key, so they still verify).
            let k = KeyPair::from_pem_and_sign_algo(&read(&key)?, &PKCS_ED25519)?;
            return write(&pem, &ca_params(name)?.self_signed(&k)?.pem(), false);
        }
        (true, false) => {
            return Err(Error::InvalidArgument(format!(
                "{} and {} must both exist or both be absent; restore the missing one \
                 (a new CA would invalidate every certificate issued so far)",
                pem.display(),
                key.display()
            )));
        }
    }
    let (k, k_pem) = new_key()?;
    let cert = ca_params(name)?.self_signed(&k)?;
    write(&key, &k_pem, true)?;
    write(&pem, &cert.pem(), false)
}

/// A new Ed25519 key, and its PKCS#8 v1 PEM (the form OpenSSL 3.0 reads,
/// for Mosquitto; rcgen with ring would write version 2).
fn new_key() -> Result<(KeyPair, zeroize::Zeroizing<String>)> {
    let sk = vitaltrail_core::SecretKey::generate(&mut rand::rngs::OsRng);
    let pem = sk
        .to_pkcs8_pem()
        .map_err(|e| Error::Certificate(e.to_string()))?;
    let kp = KeyPair::from_pem_and_sign_algo(&pem, &PKCS_ED25519)?;
    Ok((kp, pem))
}

fn issuer(ca_pem: &str, key: &KeyPair) -> Result<Issuer<'static, KeyPair>> {
    let key = KeyPair::from_pem_and_sign_algo(&key.serialize_pem(), &PKCS_ED25519)?;
    Ok(Issuer::from_ca_cert_pem(ca_pem, key)?)
}

/// The SubjectPublicKeyInfo of a device's Ed25519 public key (RFC 8410).
fn device_spki(did: &DeviceId) -> Result<rcgen::SubjectPublicKeyInfo> {
    use ed25519_dalek::pkcs8::EncodePublicKey as _;
    let der = did
        .verifying_key()
        .to_public_key_der()
        .map_err(|e| Error::Certificate(e.to_string()))?;
    Ok(rcgen::SubjectPublicKeyInfo::from_der(der.as_bytes())?)
}

/// The parameters of an end-entity certificate: this common name, these
/// DNS or IP names, one extended key use, valid for `days`.
fn leaf_params(
    cn: &str,
    names: Vec<String>,
    eku: ExtendedKeyUsagePurpose,
    days: i64,
) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(names)?;
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![eku];
    p.serial_number = Some(serial());
    validity(&mut p, days);
    Ok(p)
}

impl Pki {
    /// Open the authorities of `data_dir`, creating whatever is missing,
    /// and (re)issue the broker's certificate for `localhost`, `127.0.0.1`
    /// and `server_names`.
    pub fn load_or_create(data_dir: &Path, server_names: &[String]) -> Result<Pki> {
        let dir = data_dir.join(DIR);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        // One process at a time makes or changes these files (so no key is
        // ever paired with another process's certificate).
        let lock_path = dir.join(".lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io(&lock_path, e))?;
        lock.lock().map_err(|e| Error::io(&lock_path, e))?;
        ensure_ca(&dir, "ca", "vitaltrail device CA")?;
        ensure_ca(&dir, "server-ca", "vitaltrail server CA")?;
        ensure_ca(&dir, "pipeline-ca", "vitaltrail pipeline CA")?;
        let pki = Self::open(data_dir)?;
        pki.issue_server(server_names)?;
        if !(dir.join("pipeline.pem").exists() && dir.join("pipeline.key").exists()) {
            pki.issue_pipeline()?;
        }
        Ok(pki)
    }

    /// Open the authorities of `data_dir`, which must exist
    /// ([`Pki::load_or_create`] makes them; `vitaltrail up` calls it).
    pub fn open(data_dir: &Path) -> Result<Pki> {
        let dir = data_dir.join(DIR);
        let ca_pem = read(&dir.join("ca.pem"))?;
        let ca_key = KeyPair::from_pem_and_sign_algo(&read(&dir.join("ca.key"))?, &PKCS_ED25519)?;
        Ok(Pki {
            dir,
            ca_pem,
            ca_key,
        })
    }

    /// Where the files are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// One of the files, by name (`ca.pem`, `server.key`, ...).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The device CA's certificate (PEM): the broker trusts it for
    /// devices' certificates.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The server CA's certificate (PEM): devices and the pipeline trust it
    /// for the broker's certificate. A separate CA, so that no device
    /// certificate can ever pass for the broker's.
    pub fn server_ca_pem(&self) -> Result<String> {
        read(&self.path("server-ca.pem"))
    }

    /// A certificate (PEM) for this device's own key.
    pub fn issue_device(&self, did: &DeviceId) -> Result<String> {
        let mut p = leaf_params(
            did.as_str(),
            vec![],
            ExtendedKeyUsagePurpose::ClientAuth,
            DEVICE_CERT_DAYS,
        )?;
        p.subject_alt_names = vec![SanType::URI(did.as_str().try_into()?)];
        let issuer = issuer(&self.ca_pem, &self.ca_key)?;
        Ok(p.signed_by(&device_spki(did)?, &issuer)?.pem())
    }

    /// Issue an end-entity certificate with a new key, signed by the CA
    /// `ca` (`<ca>.pem`, `<ca>.key`), into `<stem>.pem` and `<stem>.key`.
    fn issue_with_new_key(&self, p: CertificateParams, ca: &str, stem: &str) -> Result<()> {
        let ca_pem = read(&self.path(&format!("{ca}.pem")))?;
        let ca_key = KeyPair::from_pem_and_sign_algo(
            &read(&self.path(&format!("{ca}.key")))?,
            &PKCS_ED25519,
        )?;
        let (key, key_pem) = new_key()?;
        let cert = p.signed_by(&key, &issuer(&ca_pem, &ca_key)?)?;
        write(&self.path(&format!("{stem}.key")), &key_pem, true)?;
        write(&self.path(&format!("{stem}.pem")), &cert.pem(), false)
    }

    /// (Re)issue the broker's certificate (`server.pem`, `server.key`).
    pub fn issue_server(&self, names: &[String]) -> Result<()> {
        let mut all = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        for n in names {
            if !all.contains(n) {
                all.push(n.clone());
            }
        }
        let p = leaf_params(
            "vitaltrail MQTT broker",
            all,
            ExtendedKeyUsagePurpose::ServerAuth,
            825,
        )?;
        self.issue_with_new_key(p, "server-ca", "server")
    }

    /// A nurse station's client certificate and its new key (PEM), signed
    /// by the device CA: common name `viewer:<name>`, an ECDSA P-256 key
    /// (an Ed25519 key would name a device), client authentication only;
    /// with the key's fingerprint ([`crate::viewers::key_fingerprint`]).
    pub fn issue_viewer(&self, name: &str) -> Result<(String, zeroize::Zeroizing<String>, String)> {
        if !crate::viewers::valid_name(name) {
            return Err(Error::InvalidArgument(format!("viewer name {name:?}")));
        }
        let p = leaf_params(
            &format!("{}{name}", crate::viewers::PREFIX),
            vec![],
            ExtendedKeyUsagePurpose::ClientAuth,
            DEVICE_CERT_DAYS,
        )?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let key_pem = zeroize::Zeroizing::new(key.serialize_pem());
        let cert = p.signed_by(&key, &issuer(&self.ca_pem, &self.ca_key)?)?;
        let (_, x) = x509_parser::parse_x509_certificate(cert.der())
            .map_err(|e| Error::Certificate(e.to_string()))?;
        let fingerprint = crate::viewers::key_fingerprint(x.public_key().raw);
        Ok((cert.pem(), key_pem, fingerprint))
    }

    /// Issue the pipeline's client certificate (`pipeline.pem`,
    /// `pipeline.key`), signed by the pipeline CA.
    pub fn issue_pipeline(&self) -> Result<()> {
        let p = leaf_params(
            PIPELINE_USER,
            vec![],
            ExtendedKeyUsagePurpose::ClientAuth,
            825,
        )?;
        self.issue_with_new_key(p, "pipeline-ca", "pipeline")
    }

    /// TLS for the pipeline's own connections to an external broker: trust
    /// the server CA, and prove itself with the pipeline certificate.
    pub fn pipeline_tls(&self) -> Result<crate::ClientTls> {
        crate::ClientTls::new(
            &self.server_ca_pem()?,
            &read(&self.path("pipeline.pem"))?,
            &read(&self.path("pipeline.key"))?,
        )
    }

    /// TLS for a device's connection, with a certificate issued now for its
    /// key (the simulator does this; a real device keeps its certificate).
    pub fn device_tls(&self, key: &vitaltrail_core::SecretKey) -> Result<crate::ClientTls> {
        let cert = self.issue_device(key.did())?;
        let pem = key
            .to_pkcs8_pem()
            .map_err(|e| Error::Certificate(e.to_string()))?;
        crate::ClientTls::new(&self.server_ca_pem()?, &cert, &pem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_certificate_names_the_device_and_carries_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(dir.path(), &[]).unwrap();
        let key = vitaltrail_core::SecretKey::from_seed(&[7; 32]).unwrap();
        let pem = pki.issue_device(key.did()).unwrap();
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let issuer = issuer(pki.ca_pem(), &pki.ca_key).unwrap();
        // The certificate's key is the device's own: its raw bytes appear
        // in the DER, and rustls accepts it as a client certificate.
        let raw = key.did().verifying_key().to_bytes();
        assert!(der.windows(32).any(|w| w == raw));
        assert!(pem.len() > 100);
        drop(issuer);
        crate::ClientTls::new(
            &pki.server_ca_pem().unwrap(),
            &pem,
            &key.to_pkcs8_pem().unwrap(),
        )
        .unwrap();
        // Opening again keeps the CA.
        let again = Pki::load_or_create(dir.path(), &["broker.example".into()]).unwrap();
        assert_eq!(again.ca_pem(), pki.ca_pem());
        let key_mode = std::fs::metadata(dir.path().join("mqtt/ca.key")).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(key_mode.permissions().mode() & 0o777, 0o600);
        assert!(!format!("{again:?}").contains("PRIVATE"));
        // Half a CA is refused, not replaced.
        std::fs::remove_file(dir.path().join("mqtt/ca.key")).unwrap();
        let e = Pki::load_or_create(dir.path(), &[]).unwrap_err();
        assert!(e.to_string().contains("both"), "{e}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("mqtt/ca.pem")).unwrap(),
            pki.ca_pem()
        );
    }

    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
}
