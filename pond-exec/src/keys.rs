//! Worker key files: `sealing.key` (X25519 secret) and `signing.key` (Ed25519 seed), base64,
//! mode 0600 in a 0700 directory, created on first use. The secrets never leave this machine;
//! only the public keys and their fingerprints are shown or sent.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use pond_core::keys::WorkerIdentity;
use rand::RngCore;

/// The default key directory: `$POND_WORKER_KEY_DIR`, else `$XDG_DATA_HOME/pond/worker`, else
/// `~/.local/share/pond/worker`.
pub fn default_key_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("POND_WORKER_KEY_DIR") {
        return PathBuf::from(dir);
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    data.join("pond").join("worker")
}

/// Reads a 32-byte secret key file (base64), creating it with a random key (mode 0600) when it
/// does not exist. A damaged file is an error, never silently replaced.
pub fn load_or_create_key(path: &Path) -> std::io::Result<[u8; 32]> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let bytes = base64::engine::general_purpose::STANDARD.decode(text.trim()).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", path.display()))
            })?;
            bytes.try_into().map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: not a 32-byte key", path.display()))
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut secret = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut secret);
            // create_new: two processes racing to create the key must not both win.
            let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
            file.write_all(base64::engine::general_purpose::STANDARD.encode(secret).as_bytes())?;
            file.write_all(b"\n")?;
            file.sync_all()?;
            Ok(secret)
        }
        Err(e) => Err(e),
    }
}

/// Loads the worker's keys from `dir`, creating them on first use.
pub fn load_or_create_identity(dir: &Path) -> std::io::Result<WorkerIdentity> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let sealing = load_or_create_key(&dir.join("sealing.key"))?;
    let signing = load_or_create_key(&dir.join("signing.key"))?;
    Ok(WorkerIdentity::from_secrets(sealing, signing))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_created_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("worker");
        let first = load_or_create_identity(&keys).unwrap();
        let again = load_or_create_identity(&keys).unwrap();
        assert_eq!(first.fingerprints(), again.fingerprints());
        for file in ["sealing.key", "signing.key"] {
            let mode = std::fs::metadata(keys.join(file)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{file}");
        }
        assert_eq!(std::fs::metadata(&keys).unwrap().permissions().mode() & 0o777, 0o700);
        std::fs::write(keys.join("signing.key"), "garbage").unwrap();
        assert!(load_or_create_identity(&keys).is_err(), "a damaged key is an error, not silently replaced");
    }
}
