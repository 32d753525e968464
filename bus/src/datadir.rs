//! The data directory's keys and secrets, shared by every stage.
//!
//! | file | what | made by |
//! |---|---|---|
//! | `keys/log.pem` | the log signing key (Ed25519, PKCS#8) | the first attestor |
//! | `keys/anchor.pem` | the anchor key (Ed25519, PKCS#8): epoch log checkpoints and ledger records | the first anchor without a key file |
//! | `keys/bus.key` | the bus MAC key (64 hex digits) | the first ingest or attestor |
//! | `keys/operator.pem` | the operator key signing `vitals.devices` | `devices add --kafka`, or the first Kafka stage without `--operator` |
//! | `keys/metrics.token`, `keys/sql.token` | HTTP bearer tokens | the HTTP server |
//! | `devices.json` | the device registry | `vitaltrail devices` |
//!
//! Every secret is created with mode 0600 and never overwritten: when two
//! processes race to create one, the first one's stands and both use it.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use vitaltrail_core::auth::Token;
use vitaltrail_core::busauth::BusKey;
use vitaltrail_core::{DeviceId, SecretKey};

use crate::registry::RegistryFile;
use crate::{Error, Result};

fn err(path: &Path, detail: impl std::fmt::Display) -> Error {
    Error::DataDir {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    }
}

/// The log signing key file.
pub fn log_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("keys").join("log.pem")
}

/// The anchor key file (`<data>/keys/anchor.pem`).
pub fn anchor_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("keys").join("anchor.pem")
}

/// The bus key file (`<data>/keys/bus.key`).
pub fn bus_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("keys").join("bus.key")
}

/// The operator key file (`<data>/keys/operator.pem`).
pub fn operator_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("keys").join("operator.pem")
}

/// The bearer token of `/metrics` (`<data>/keys/metrics.token`).
pub fn metrics_token_path(data_dir: &Path) -> PathBuf {
    data_dir.join("keys").join("metrics.token")
}

/// The bearer token of `POST /sql` (`<data>/keys/sql.token`).
pub fn sql_token_path(data_dir: &Path) -> PathBuf {
    data_dir.join("keys").join("sql.token")
}

/// The operator's bearer token of `POST /alerts/<id>/ack`
/// (`<data>/keys/alerts.token`).
pub fn alerts_token_path(data_dir: &Path) -> PathBuf {
    data_dir.join("keys").join("alerts.token")
}

/// The device registry of a data directory.
pub fn registry_file(data_dir: &Path) -> RegistryFile {
    RegistryFile::new(data_dir.join("devices.json"))
}

/// How many partition logs a data directory holds (0 for a new one).
pub fn existing_partitions(data_dir: &Path) -> u32 {
    (0u32..)
        .take_while(|p| data_dir.join("partitions").join(p.to_string()).is_dir())
        .count() as u32
}

/// Create `path` (mode 0600) holding exactly `bytes`, atomically: the
/// bytes go to a temp file first (fsynced), which is then hard-linked to
/// `path`. A crash leaves either no file or the whole one, never an empty
/// key that blocks every restart. Returns `false` if `path` already
/// existed (it is left as it was).
fn create_atomically(path: &Path, bytes: &[u8]) -> Result<bool> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| err(path, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|_| f.sync_all()));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(path, format!("writing: {e}")));
    }
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(err(path, format!("creating: {e}"))),
    }
}

/// Write a new secret file (mode 0600); an existing file is kept (another
/// process created it first: theirs stands).
pub fn write_secret(path: &Path, text: &str) -> Result<()> {
    create_atomically(path, text.as_bytes()).map(|_| ())
}

/// Write a new key file (PKCS#8 PEM) with mode 0600, refusing to overwrite.
pub fn write_key(path: &Path, key: &SecretKey) -> Result<()> {
    let pem = key.to_pkcs8_pem().map_err(|e| err(path, e))?;
    if create_atomically(path, pem.as_bytes())? {
        Ok(())
    } else {
        Err(err(path, "creating: it must not exist yet"))
    }
}

/// Read a PKCS#8 key file.
fn read_key(path: &Path) -> Result<SecretKey> {
    let pem = std::fs::read_to_string(path).map_err(|e| err(path, format!("reading: {e}")))?;
    SecretKey::from_pkcs8_pem(&pem).map_err(|e| err(path, e))
}

/// The log signing key (`<data>/keys/log.pem`), created once.
pub fn log_key(data_dir: &Path) -> Result<SecretKey> {
    key_created_once(&log_key_path(data_dir))
}

/// The anchor key: the PKCS#8 PEM file `key_file` when given (it must
/// exist), else the PEM text in `$VITALTRAIL_ANCHOR_KEY` when set, else
/// `<data>/keys/anchor.pem`, created once. Never from a flag.
pub fn anchor_key(data_dir: &Path, key_file: Option<&Path>) -> Result<SecretKey> {
    if let Some(f) = key_file {
        return read_key(f);
    }
    if let Ok(pem) = std::env::var("VITALTRAIL_ANCHOR_KEY") {
        return SecretKey::from_pkcs8_pem(&pem)
            .map_err(|e| err(Path::new("$VITALTRAIL_ANCHOR_KEY"), e));
    }
    key_created_once(&anchor_key_path(data_dir))
}

/// The key at `path`, created if there is none yet.
fn key_created_once(path: &Path) -> Result<SecretKey> {
    if path.exists() {
        return read_key(path);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(path, e))?;
    }
    let key = SecretKey::generate(&mut rand::rngs::OsRng);
    match write_key(path, &key) {
        Ok(()) => Ok(key),
        // Another process made it first: use theirs.
        Err(_) if path.exists() => read_key(path),
        Err(e) => Err(e),
    }
}

/// The operator key (`<data>/keys/operator.pem`), created on first use: it
/// signs every `vitals.devices` record.
pub fn operator_key(data_dir: &Path) -> Result<SecretKey> {
    let path = operator_key_path(data_dir);
    if !path.exists() {
        let key = SecretKey::generate(&mut rand::rngs::OsRng);
        write_secret(&path, &key.to_pkcs8_pem().map_err(|e| err(&path, e))?)?;
        tracing::warn!(
            path = %path.display(),
            did = %key.did(),
            "created the operator key: give every ingest and attestor --operator <this DID>"
        );
    }
    read_key(&path)
}

/// Whose signature the registry topic must carry: the one given, else the
/// data directory's own operator key.
pub fn trusted_operator(given: Option<&DeviceId>, data_dir: &Path) -> Result<DeviceId> {
    match given {
        Some(d) => Ok(d.clone()),
        None => Ok(operator_key(data_dir)?.did().clone()),
    }
}

/// The bus key at `path` (64 hex digits), created (mode 0600) if absent.
/// Every ingest and attestor of one pipeline must use the same key.
pub fn load_bus_key(path: &Path) -> Result<BusKey> {
    if !path.exists() {
        let key = BusKey::generate(&mut rand::rngs::OsRng);
        write_secret(path, &format!("{}\n", key.to_hex()))?;
    }
    let text = std::fs::read_to_string(path).map_err(|e| err(path, format!("reading: {e}")))?;
    BusKey::from_hex(&text).ok_or_else(|| err(path, "does not hold a bus key (64 hex digits)"))
}

/// Read the bearer token at `path`, creating it (mode 0600) if absent.
pub fn load_or_create_token(path: &Path) -> Result<Token> {
    match std::fs::read_to_string(path) {
        Ok(s) => return Token::parse(s.trim()).map_err(|e| err(path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(path, format!("reading: {e}"))),
    }
    let token = Token::generate(&mut rand::rngs::OsRng);
    write_secret(path, &format!("{}\n", token.expose()))?;
    // Read back: if another process won the race, its token stands.
    let text = std::fs::read_to_string(path).map_err(|e| err(path, format!("reading: {e}")))?;
    Token::parse(text.trim()).map_err(|e| err(path, e))
}

/// librdkafka client properties from a file of `key=value` lines (`#`
/// comments), e.g. `security.protocol=SASL_SSL` and `sasl.password=…`: a
/// file, so no secret is ever on a command line.
pub fn read_kafka_client_config(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).map_err(|e| err(path, format!("reading: {e}")))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| err(path, format!("line {}: expected key=value", n + 1)))?;
        out.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_created_once_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let a = load_or_create_token(&sql_token_path(d.path())).unwrap();
        let b = load_or_create_token(&sql_token_path(d.path())).unwrap();
        assert_eq!(a.expose(), b.expose());
        let mode = std::fs::metadata(sql_token_path(d.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let k1 = log_key(d.path()).unwrap();
        let k2 = log_key(d.path()).unwrap();
        assert_eq!(k1.did(), k2.did());
        let bk = load_bus_key(&bus_key_path(d.path())).unwrap();
        assert_eq!(
            bk.to_hex(),
            load_bus_key(&bus_key_path(d.path())).unwrap().to_hex()
        );
    }

    #[test]
    fn kafka_client_file_is_key_value_lines() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k.properties");
        std::fs::write(
            &p,
            "# c\nsecurity.protocol = SASL_SSL\n\nsasl.password=x=y\n",
        )
        .unwrap();
        assert_eq!(
            read_kafka_client_config(&p).unwrap(),
            vec![
                ("security.protocol".into(), "SASL_SSL".into()),
                ("sasl.password".into(), "x=y".into())
            ]
        );
        std::fs::write(&p, "nonsense\n").unwrap();
        assert!(read_kafka_client_config(&p).is_err());
    }
}
