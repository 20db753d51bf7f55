//! The server's host key: ed25519, made on a VM's first boot from the
//! kernel's random numbers and kept in `/etc/ssh`, so that it stays the same
//! across `mmctl stop`/`start` (the root is the VM's own persistent writable
//! overlay) and a host that pinned it keeps trusting it.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use russh::keys::ssh_key::LineEnding;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::{Algorithm, PrivateKey};
use zeroize::Zeroizing;

use super::SshError;

/// Where the private key lives; the public key goes next to it as `.pub`.
pub const HOST_KEY_PATH: &str = "/etc/ssh/mm_host_ed25519_key";

/// Where the key came from, for the console.
#[derive(Debug)]
pub enum Origin {
    /// Read from the file made on an earlier boot.
    Loaded,
    /// Made now and stored; `replaced` says why an existing file was not used.
    Created { replaced: Option<String> },
    /// Made now, but it could not be stored: it lasts until shutdown.
    InMemory { reason: String },
}

/// Loads the host key at `path`, or makes and stores a new one. Only a
/// failure to make a key at all is an error; a key that cannot be stored
/// is used from memory.
pub fn load_or_create(path: &Path) -> Result<(PrivateKey, Origin), SshError> {
    let replaced = match fs::read(path) {
        Ok(pem) => match PrivateKey::from_openssh(&pem) {
            Ok(key) if key.algorithm() == Algorithm::Ed25519 && !key.is_encrypted() => {
                return Ok((key, Origin::Loaded));
            }
            Ok(key) => Some(format!("{} holds an unusable {} key", path.display(), key.algorithm())),
            Err(e) => Some(format!("{} is not an OpenSSH private key ({e})", path.display())),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => Some(format!("cannot read {}: {e}", path.display())),
    };
    let key = generate()?;
    let origin = match store(&key, path) {
        Ok(()) => Origin::Created { replaced },
        Err(e) => Origin::InMemory { reason: e.to_string() },
    };
    Ok((key, origin))
}

/// A new ed25519 key from the kernel's random numbers. `getrandom(2)`
/// without flags blocks until the kernel's generator is seeded, which is
/// what we want for a long-lived key (we run on the server's own thread,
/// so this never holds up the workload).
pub fn generate() -> Result<PrivateKey, SshError> {
    let mut seed = Zeroizing::new([0u8; 32]);
    kernel_random(&mut seed[..]).map_err(SshError::Random)?;
    Ok(PrivateKey::from(Ed25519Keypair::from_seed(&seed)))
}

fn kernel_random(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: getrandom(2) writes at most `rest.len()` bytes to the
        // start of `rest`, a live, exclusively borrowed buffer.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(())
}

/// Writes the key (mode 0600, OpenSSH format) and its `.pub`, each through
/// a temporary file and a rename, so a crash mid-write never leaves a
/// half-written key to trip over on the next boot.
pub fn store(key: &PrivateKey, path: &Path) -> Result<(), SshError> {
    let fail = |source: io::Error| SshError::StoreHostKey { path: path.to_path_buf(), source };
    let pem = key.to_openssh(LineEnding::LF).map_err(SshError::KeyEncoding)?;
    let public = key.public_key().to_openssh().map_err(SshError::KeyEncoding)?;
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(fail)?;
    }
    write_atomically(path, pem.as_bytes(), 0o600).map_err(fail)?;
    write_atomically(&pub_path(path), format!("{public}\n").as_bytes(), 0o644).map_err(fail)
}

fn pub_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

fn write_atomically(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    // A leftover from a crash would keep its old mode through O_TRUNC.
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
    file.write_all(data)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path)?;
    // The rename is durable once the directory is.
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn made_once_then_loaded_and_readable_by_ssh_keygen() {
        let dir = super::super::tests::scratch_dir("hostkey");
        let path = dir.join("etc/ssh/mm_host_ed25519_key");
        let (made, origin) = load_or_create(&path).unwrap();
        assert!(matches!(origin, Origin::Created { replaced: None }), "{origin:?}");
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let (loaded, origin) = load_or_create(&path).unwrap();
        assert!(matches!(origin, Origin::Loaded), "{origin:?}");
        assert_eq!(made.public_key(), loaded.public_key());

        // OpenSSH itself reads the file and derives the same public key.
        let out = std::process::Command::new("ssh-keygen").arg("-y").arg("-f").arg(&path).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let public = made.public_key().to_openssh().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), public);
        assert_eq!(fs::read_to_string(pub_path(&path)).unwrap().trim(), public);

        // A damaged file is replaced, and we say why.
        fs::write(&path, "junk").unwrap();
        let (_, origin) = load_or_create(&path).unwrap();
        assert!(matches!(origin, Origin::Created { replaced: Some(_) }), "{origin:?}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unwritable_place_keeps_the_key_in_memory() {
        let dir = super::super::tests::scratch_dir("hostkey-ro");
        // A regular file where the directory should be: fails even as root.
        fs::write(dir.join("etc"), "").unwrap();
        let (_, origin) = load_or_create(&dir.join("etc/ssh/key")).unwrap();
        assert!(matches!(origin, Origin::InMemory { .. }), "{origin:?}");
        let _ = fs::remove_dir_all(&dir);
    }
}
