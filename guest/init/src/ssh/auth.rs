//! Which client keys may log in: the `mm.ssh=` lines, in OpenSSH
//! `authorized_keys` format.
//!
//! Kept deliberately simple: a key is authorized when its public key data
//! (the base64 blob) equals one of the lines'. Comments are ignored, and so
//! are options (`command="…"`, `from="…"`, `restrict`, …): they are not
//! enforced, so a line with options grants the same full root login as one
//! without. Certificates (`*-cert-v01@openssh.com`) are not trusted as
//! authorities; they only match their own blob.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use russh::keys::PublicKey;

/// The public key blobs that may log in.
#[derive(Debug, Default, Clone)]
pub struct AuthorizedKeys {
    blobs: Vec<Vec<u8>>,
}

impl AuthorizedKeys {
    /// Parses `authorized_keys` lines (an entry may itself hold several
    /// lines). Returns the keys and a description of each line that holds
    /// no key, for the console.
    pub fn parse(lines: &[String]) -> (Self, Vec<String>) {
        let mut keys = AuthorizedKeys::default();
        let mut problems = Vec::new();
        for line in lines.iter().flat_map(|entry| entry.lines()) {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match key_blob(line) {
                Some(blob) => {
                    if !keys.blobs.contains(&blob) {
                        keys.blobs.push(blob);
                    }
                }
                None => problems.push(format!("no public key in authorized key line {:?}", shorten(line))),
            }
        }
        (keys, problems)
    }

    pub fn len(&self) -> usize {
        self.blobs.len()
    }

    /// Whether `key`'s public key data is one of ours.
    pub fn contains(&self, key: &PublicKey) -> bool {
        match key.to_bytes() {
            Ok(blob) => self.blobs.contains(&blob),
            Err(_) => false,
        }
    }
}

/// The key blob of one line: the first token that names a key type and is
/// followed by base64 data whose own type field (the blob starts with its
/// type as an SSH string) says the same. This skips the options in front
/// without parsing their quoting.
fn key_blob(line: &str) -> Option<Vec<u8>> {
    let tokens: Vec<&str> = line.split_whitespace().collect();
    tokens.windows(2).find_map(|pair| {
        let blob = STANDARD.decode(pair[1]).ok()?;
        let len = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?) as usize;
        let kind = blob.get(4..4usize.checked_add(len)?)?;
        (kind == pair[0].as_bytes()).then_some(blob)
    })
}

/// A client's public key made from `seed`, for tests that need keys to
/// authorize (the same seed, the same key).
#[cfg(test)]
pub fn test_key(seed: u8) -> PublicKey {
    use russh::keys::PrivateKey;
    use russh::keys::ssh_key::private::Ed25519Keypair;
    PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32])).public_key().clone()
}

/// A line cut short for a log message (it may be long, and it is the
/// host's own input, so there is nothing secret in it).
fn shorten(line: &str) -> String {
    match line.char_indices().nth(60) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::test_key as key;
    use super::*;

    #[test]
    fn matches_the_blob_and_ignores_options_and_comments() {
        let a = key(1).to_openssh().unwrap();
        let b = key(2).to_openssh().unwrap();
        let lines = vec![
            format!("{a} alice@laptop"),
            format!("# a comment\ncommand=\"echo hi there\",no-pty {b} bob"),
            "garbage".to_string(),
            String::new(),
        ];
        let (keys, problems) = AuthorizedKeys::parse(&lines);
        assert_eq!(keys.len(), 2);
        assert!(keys.contains(&key(1)));
        assert!(keys.contains(&key(2)));
        assert!(!keys.contains(&key(3)));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("garbage"));
    }

    #[test]
    fn a_type_that_disagrees_with_the_blob_is_no_key() {
        let a = key(1).to_openssh().unwrap();
        let forged = a.replace("ssh-ed25519", "ssh-rsa");
        let (keys, problems) = AuthorizedKeys::parse(&[forged]);
        assert_eq!((keys.len(), problems.len()), (0, 1));
        let (keys, _) = AuthorizedKeys::parse(&[]);
        assert!(!keys.contains(&key(1)));
    }
}
