//! A new identity for a guest restored from a snapshot.
//!
//! Every microVM restored from one snapshot wakes up as a copy of the same
//! guest: same hostname, MAC, address, SSH host key, clock (frozen at the
//! snapshot) and, worst of all, the same kernel random-number state, so two
//! clones would hand out the same "random" numbers. The host sends a
//! [`GuestIdentity`] as the first frame of a connection (type `0x06`, see
//! the crate documentation) and the guest takes it on without a reboot.
//!
//! It also carries what a warm-started guest (booted with `mm.wait`, see
//! [`crate::Workload`]) could not get on its kernel command line, which was
//! written once for every run of its image: the SSH keys that may log in.

use std::fmt;
use std::io::{self, Read};

use serde::{Deserialize, Serialize};

/// Random bytes a host should send: 512 bits, twice the kernel CRNG's
/// 256-bit key, so the reseed does not hinge on any one source.
pub const ENTROPY_BYTES: usize = 64;
/// The fewest the guest accepts: 256 bits, the size of the CRNG's key. Less
/// would leave clones guessable from each other, so it is refused outright.
pub const MIN_ENTROPY_BYTES: usize = 32;

/// What a restored guest becomes. Every field but `entropy` is optional:
/// `None` (or an empty `dns`) leaves that part of the guest as it is, and
/// missing JSON fields take those defaults, so a host may send only what
/// changed. Unknown fields are ignored, so newer hosts can talk to older
/// guests.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct GuestIdentity {
    /// The new hostname (also written to `/etc/hosts`).
    pub hostname: Option<String>,
    /// eth0's new MAC, `02:6d:0a:64:00:05` form (a unicast address).
    pub mac: Option<String>,
    /// eth0's new address with its prefix length, `10.100.0.5/24`.
    pub address: Option<String>,
    /// The new default route's gateway, `10.100.0.1`.
    pub gateway: Option<String>,
    /// Name servers for `/etc/resolv.conf`; empty leaves the file alone.
    pub dns: Vec<String>,
    /// Random bytes from the host, hex-encoded, mixed into the guest
    /// kernel's pool before it reseeds. At least [`MIN_ENTROPY_BYTES`].
    pub entropy: String,
    /// The host's `CLOCK_REALTIME` in nanoseconds since the epoch: the
    /// guest's clock stood still while it was a snapshot.
    pub realtime_ns: Option<u64>,
    /// Replace the SSH host key (on disk and in the running server): a
    /// clone must not be able to impersonate its siblings.
    pub new_ssh_host_key: bool,
    /// Replace the keys that may log in to the guest's SSH server (OpenSSH
    /// `authorized_keys` lines, as `mm.ssh` gives them at boot): new
    /// connections check the new set, logins already made stay. A
    /// snapshot taken before any run (a warm start) knows no run's keys.
    /// `Some` of an empty list locks every login out; `None` leaves the
    /// keys as they are. A line that holds no key refuses the whole
    /// identity; a guest without an SSH server (no network) takes the keys
    /// as done, since nobody can log in to it anyway.
    pub ssh_keys: Option<Vec<String>>,
}

/// Why the guest refuses an identity's entropy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("entropy is not an even number of hexadecimal digits")]
    EntropyNotHex,
    #[error("{got} bytes of entropy are under the minimum of {MIN_ENTROPY_BYTES}")]
    TooLittleEntropy { got: usize },
}

impl GuestIdentity {
    /// An identity carrying `entropy` and changing nothing else yet; set the
    /// other fields as needed.
    pub fn new(entropy: &[u8]) -> Self {
        let entropy = entropy.iter().map(|b| format!("{b:02x}")).collect();
        GuestIdentity { entropy, ..GuestIdentity::default() }
    }

    /// What a host restoring a snapshot starts from: [`ENTROPY_BYTES`] of
    /// the host kernel's random numbers (`/dev/urandom`) and `realtime_ns`
    /// from the host's clock now, changing nothing else yet; set the rest
    /// and send it at once (the clock moves on).
    pub fn fresh() -> io::Result<Self> {
        let mut bytes = [0u8; ENTROPY_BYTES];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_err(io::Error::other)?;
        let realtime_ns = u64::try_from(now.as_nanos()).map_err(io::Error::other)?;
        Ok(GuestIdentity { realtime_ns: Some(realtime_ns), ..GuestIdentity::new(&bytes) })
    }

    /// The entropy as bytes: refused when it is not hex or is shorter than
    /// [`MIN_ENTROPY_BYTES`].
    pub fn entropy_bytes(&self) -> Result<Vec<u8>, IdentityError> {
        let pairs = self.entropy.as_bytes().chunks_exact(2);
        if !pairs.remainder().is_empty() {
            return Err(IdentityError::EntropyNotHex);
        }
        let nibble = |c: u8| (c as char).to_digit(16).ok_or(IdentityError::EntropyNotHex);
        let bytes =
            pairs.map(|pair| Ok(((nibble(pair[0])? << 4) | nibble(pair[1])?) as u8)).collect::<Result<Vec<u8>, _>>()?;
        if bytes.len() < MIN_ENTROPY_BYTES {
            return Err(IdentityError::TooLittleEntropy { got: bytes.len() });
        }
        Ok(bytes)
    }
}

/// Shows everything but the entropy, which is seed material for the
/// guest's random numbers and has no business in logs.
impl fmt::Debug for GuestIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestIdentity")
            .field("hostname", &self.hostname)
            .field("mac", &self.mac)
            .field("address", &self.address)
            .field("gateway", &self.gateway)
            .field("dns", &self.dns)
            .field("entropy", &format_args!("<{} hex digits>", self.entropy.len()))
            .field("realtime_ns", &self.realtime_ns)
            .field("new_ssh_host_key", &self.new_ssh_host_key)
            .field("ssh_keys", &self.ssh_keys)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> GuestIdentity {
        GuestIdentity {
            hostname: Some("clone-1".into()),
            mac: Some("02:6d:0a:64:00:05".into()),
            address: Some("10.100.0.5/24".into()),
            gateway: Some("10.100.0.1".into()),
            dns: vec!["10.100.0.1".into(), "9.9.9.9".into()],
            realtime_ns: Some(1_700_000_000_123_456_789),
            new_ssh_host_key: true,
            ssh_keys: Some(vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIO9 alice@laptop".into()]),
            ..GuestIdentity::new(&[0xa5; ENTROPY_BYTES])
        }
    }

    #[test]
    fn json_round_trip_and_shape() {
        let identity = full();
        let json = serde_json::to_value(&identity).unwrap();
        assert_eq!(json["mac"], "02:6d:0a:64:00:05");
        assert_eq!(json["entropy"], "a5".repeat(ENTROPY_BYTES));
        assert_eq!(json["realtime_ns"], 1_700_000_000_123_456_789u64);
        assert_eq!(json["ssh_keys"], serde_json::json!(["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIO9 alice@laptop"]));
        let back: GuestIdentity = serde_json::from_value(json).unwrap();
        assert_eq!(back, identity);
        assert_eq!(back.entropy_bytes().unwrap(), vec![0xa5; ENTROPY_BYTES]);
    }

    #[test]
    fn missing_fields_default_and_unknown_ones_are_ignored() {
        let identity: GuestIdentity =
            serde_json::from_str(r#"{"hostname":"h","from_the_future":{"x":[1,2]},"entropy":"00"}"#).unwrap();
        assert_eq!(
            identity,
            GuestIdentity { hostname: Some("h".into()), entropy: "00".into(), ..GuestIdentity::default() }
        );
        let empty: GuestIdentity = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, GuestIdentity::default());
        assert!(!empty.new_ssh_host_key);
        assert_eq!(empty.ssh_keys, None, "no ssh_keys: the keys stay as they are");
        // An empty list is not the same as none: it locks logins out.
        let locked: GuestIdentity = serde_json::from_str(r#"{"ssh_keys":[],"entropy":"00"}"#).unwrap();
        assert_eq!(locked.ssh_keys, Some(Vec::new()));
        let null: GuestIdentity = serde_json::from_str(r#"{"ssh_keys":null}"#).unwrap();
        assert_eq!(null.ssh_keys, None);
    }

    #[test]
    fn too_little_or_malformed_entropy_is_refused() {
        let short = GuestIdentity::new(&[7; MIN_ENTROPY_BYTES - 1]);
        assert_eq!(short.entropy_bytes(), Err(IdentityError::TooLittleEntropy { got: MIN_ENTROPY_BYTES - 1 }));
        assert_eq!(GuestIdentity::default().entropy_bytes(), Err(IdentityError::TooLittleEntropy { got: 0 }));
        assert_eq!(GuestIdentity::new(&[7; MIN_ENTROPY_BYTES]).entropy_bytes().unwrap().len(), MIN_ENTROPY_BYTES);
        for bad in ["a".repeat(2 * MIN_ENTROPY_BYTES + 1), format!("{}zz", "00".repeat(MIN_ENTROPY_BYTES)), "é".into()]
        {
            let identity = GuestIdentity { entropy: bad, ..GuestIdentity::default() };
            assert_eq!(identity.entropy_bytes(), Err(IdentityError::EntropyNotHex));
        }
        // Upper case is hex too.
        let upper = GuestIdentity { entropy: "AB".repeat(MIN_ENTROPY_BYTES), ..GuestIdentity::default() };
        assert_eq!(upper.entropy_bytes().unwrap(), vec![0xab; MIN_ENTROPY_BYTES]);
    }

    #[test]
    fn garbage_json_is_an_error() {
        for garbage in [
            "",
            "null",
            "\"x\"",
            "[1]",
            "{\"dns\":\"1.1.1.1\"}",
            "{\"realtime_ns\":-1}",
            "{\"entropy\":",
            "{\"ssh_keys\":\"ssh-ed25519 AAAA\"}",
            "{\"ssh_keys\":[[\"a\"]]}",
        ] {
            assert!(serde_json::from_str::<GuestIdentity>(garbage).is_err(), "{garbage:?}");
        }
    }

    #[test]
    fn fresh_has_entropy_and_the_clock() {
        let identity = GuestIdentity::fresh().unwrap();
        assert_eq!(identity.entropy_bytes().unwrap().len(), ENTROPY_BYTES);
        assert_ne!(identity.entropy, GuestIdentity::fresh().unwrap().entropy);
        assert!(identity.realtime_ns.unwrap() > 1_600_000_000 * 1_000_000_000);
    }

    #[test]
    fn debug_hides_the_entropy() {
        let shown = format!("{:?}", full());
        assert!(!shown.contains("a5a5"), "{shown}");
        assert!(shown.contains("<128 hex digits>") && shown.contains("clone-1"), "{shown}");
    }
}
