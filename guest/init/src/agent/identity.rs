//! A new identity for a guest restored from a snapshot under a new name:
//! the identity frame (type `0x06`, see the `mm-exec-protocol` crate docs),
//! applied without a reboot.
//!
//! The identity is checked whole first ([`Plan::parse`]): a malformed one
//! changes nothing. Then, on the session's own thread, in this order, since
//! each step relies on those before it:
//!
//! 1. the kernel's random numbers are reseeded with the host's entropy:
//!    until then every clone's generator is in the same state and would
//!    give out the same numbers (no virtual machine generation ID device
//!    does it for us);
//! 2. the clock, which stood still while the guest was a snapshot;
//! 3. hostname and network, through [`network::apply`], the code boot uses;
//! 4. the SSH host key, made from the reseeded random numbers: it is
//!    skipped when the reseed failed, since it would then be the same key
//!    in every clone;
//! 5. the keys that may log in over SSH, which a warm-started guest (one
//!    snapshot per image, taken before any run) cannot have had on its
//!    kernel command line; this step cannot fail (without a server there
//!    is nobody to log in). Every line must hold a key: one that does not
//!    refuses the identity, rather than locking its owner out unnoticed.
//!
//! A failed step does not stop the later ones (fresh random numbers without
//! a new address are still worth having); the answer names every step that
//! failed.

use std::fs::OpenOptions;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::{Mutex, PoisonError};

use mm_exec_protocol::GuestIdentity;
use nix::sys::time::TimeSpec;
use nix::time::ClockId;
use zeroize::Zeroizing;

use crate::network::{self, MacAddr, MacError, NetConfig, StepError};
use crate::settings::Ipv4Net;
use crate::ssh::AuthorizedKeys;

/// `RNDADDENTROPY` from linux/random.h, `_IOW('R', 0x03, int[2])`: mixes a
/// `struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }`
/// into the input pool and credits `entropy_count` bits. Root only.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG` from linux/random.h, `_IO('R', 0x07)`: reseeds the CRNG
/// from the input pool now rather than at its next scheduled reseed, which
/// may be a minute away. Root only.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Longest hostname Linux takes (`HOST_NAME_MAX`).
const HOST_NAME_MAX: usize = 64;

/// Two identities at once (a confused host) would interleave their steps;
/// one waits for the other instead.
static APPLYING: Mutex<()> = Mutex::new(());

/// Why an identity is refused before anything is applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidIdentity {
    #[error(transparent)]
    Entropy(#[from] mm_exec_protocol::IdentityError),
    /// Also keeps `/etc/hosts` well-formed: no spaces, tabs or newlines.
    #[error("hostname {0:?}: want 1 to {HOST_NAME_MAX} letters, digits, '-', '_' or '.'")]
    Hostname(String),
    #[error("mac {0:?}: {1}")]
    Mac(String, MacError),
    #[error("address {0:?}: not an IPv4 ADDRESS/PREFIX")]
    Address(String),
    #[error("gateway {0:?}: not an IPv4 address")]
    Gateway(String),
    #[error("dns {0:?}: not an IPv4 address")]
    Dns(String),
    /// The problem with the first line that holds no key.
    #[error("ssh_keys: {0}")]
    SshKeys(String),
}

/// Applies `identity` and returns the message for the error frame when it
/// was refused or a step failed. Every outcome is also one console line.
pub fn apply(identity: &GuestIdentity) -> Result<(), String> {
    let plan = Plan::parse(identity).map_err(|e| format!("invalid identity: {e}"))?;
    let _one_at_a_time = APPLYING.lock().unwrap_or_else(PoisonError::into_inner);
    let failed = plan.apply();
    if failed.is_empty() {
        println!("mm-init: new identity applied");
        return Ok(());
    }
    let message = failed.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
    eprintln!("mm-init: new identity: {message}");
    Err(message)
}

/// An identity checked and parsed, ready to apply.
struct Plan {
    entropy: Zeroizing<Vec<u8>>,
    realtime: Option<TimeSpec>,
    net: NetConfig,
    new_ssh_host_key: bool,
    ssh_keys: Option<AuthorizedKeys>,
}

impl Plan {
    fn parse(identity: &GuestIdentity) -> Result<Plan, InvalidIdentity> {
        let entropy = Zeroizing::new(identity.entropy_bytes()?);
        let hostname = identity.hostname.as_deref().map(checked_hostname).transpose()?;
        let mac = identity
            .mac
            .as_deref()
            .map(|mac| mac.parse::<MacAddr>().map_err(|e| InvalidIdentity::Mac(mac.into(), e)))
            .transpose()?;
        let address = identity
            .address
            .as_deref()
            .map(|net| net.parse::<Ipv4Net>().map_err(|()| InvalidIdentity::Address(net.into())))
            .transpose()?;
        let gateway = identity
            .gateway
            .as_deref()
            .map(|gw| gw.parse::<Ipv4Addr>().map_err(|_| InvalidIdentity::Gateway(gw.into())))
            .transpose()?;
        let dns = identity
            .dns
            .iter()
            .map(|ns| ns.parse::<Ipv4Addr>().map_err(|_| InvalidIdentity::Dns(ns.clone())))
            .collect::<Result<_, _>>()?;
        // Any u64 of nanoseconds fits a 64-bit time_t; the kernel refuses
        // what it cannot represent, which is then a failed step.
        let realtime =
            identity.realtime_ns.map(|ns| TimeSpec::new((ns / 1_000_000_000) as _, (ns % 1_000_000_000) as _));
        let ssh_keys = identity
            .ssh_keys
            .as_deref()
            .map(|lines| match AuthorizedKeys::parse(lines) {
                (keys, problems) if problems.is_empty() => Ok(keys),
                (_, mut problems) => Err(InvalidIdentity::SshKeys(problems.swap_remove(0))),
            })
            .transpose()?;
        Ok(Plan {
            entropy,
            realtime,
            net: NetConfig { hostname, mac, address, gateway, dns },
            new_ssh_host_key: identity.new_ssh_host_key,
            ssh_keys,
        })
    }

    /// Runs the steps in order (see the module docs); what failed.
    fn apply(&self) -> Vec<StepError> {
        let mut failed = Vec::new();
        let reseeded = reseed_random(&self.entropy);
        let reseeded_ok = reseeded.is_ok();
        failed.extend(reseeded.err().map(|e| StepError::new("random numbers", e)));
        if let Some(time) = self.realtime
            && let Err(e) = nix::time::clock_settime(ClockId::CLOCK_REALTIME, time)
        {
            failed.push(StepError::new("clock", e));
        }
        failed.extend(network::apply(&self.net));
        if self.new_ssh_host_key {
            let renewed = if reseeded_ok {
                crate::ssh::renew_host_key().map_err(io::Error::other)
            } else {
                Err(io::Error::other("skipped: the random numbers were not reseeded"))
            };
            failed.extend(renewed.err().map(|e| StepError::new("ssh host key", e)));
        }
        if let Some(keys) = &self.ssh_keys {
            crate::ssh::set_authorized_keys(keys.clone());
        }
        failed
    }
}

/// `name` if Linux and `/etc/hosts` can both carry it.
fn checked_hostname(name: &str) -> Result<String, InvalidIdentity> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || name.len() > HOST_NAME_MAX || !name.chars().all(allowed) {
        return Err(InvalidIdentity::Hostname(name.to_string()));
    }
    Ok(name.to_string())
}

/// Mixes `entropy` into the kernel's input pool, credited in full (it comes
/// from the host's own kernel generator), then reseeds the CRNG from it.
fn reseed_random(entropy: &[u8]) -> io::Result<()> {
    let urandom = OpenOptions::new().write(true).open("/dev/urandom")?;
    let too_long = || io::Error::from(io::ErrorKind::InvalidInput);
    let len = i32::try_from(entropy.len()).map_err(|_| too_long())?;
    let bits = len.checked_mul(8).ok_or_else(too_long)?;
    // Sized up front: growing would leave an unwiped copy behind.
    let mut info = Zeroizing::new(Vec::with_capacity(8 + entropy.len()));
    info.extend_from_slice(&bits.to_ne_bytes());
    info.extend_from_slice(&len.to_ne_bytes());
    info.extend_from_slice(entropy);
    // SAFETY: RNDADDENTROPY reads a rand_pool_info from the pointer: two
    // ints, then buf_size (`len`) bytes, which is exactly what `info` holds
    // (the kernel copies it in, so alignment does not matter); it writes
    // nothing back.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mm_exec_protocol::{ENTROPY_BYTES, IdentityError, MIN_ENTROPY_BYTES};

    fn identity() -> GuestIdentity {
        GuestIdentity::new(&[0x5a; ENTROPY_BYTES])
    }

    /// An `authorized_keys` line for a key made from `seed`.
    fn key_line(seed: u8) -> String {
        format!("{} test-{seed}@host", crate::ssh::test_key(seed).to_openssh().unwrap())
    }

    #[test]
    fn a_full_identity_parses() {
        let plan = Plan::parse(&GuestIdentity {
            hostname: Some("clone-1.example".into()),
            mac: Some("02:6D:0a:64:00:05".into()),
            address: Some("10.100.0.5/24".into()),
            gateway: Some("10.100.0.1".into()),
            dns: vec!["10.100.0.1".into(), "9.9.9.9".into()],
            realtime_ns: Some(1_700_000_000_123_456_789),
            new_ssh_host_key: true,
            ssh_keys: Some(vec![key_line(1), format!("# the run's keys\n{}\n\n{}", key_line(2), key_line(1))]),
            ..identity()
        })
        .unwrap();
        assert_eq!(plan.ssh_keys.map(|keys| keys.len()), Some(2));
        assert_eq!(*plan.entropy, vec![0x5a; ENTROPY_BYTES]);
        assert_eq!(plan.realtime, Some(TimeSpec::new(1_700_000_000, 123_456_789)));
        assert!(plan.new_ssh_host_key);
        let expected = NetConfig {
            hostname: Some("clone-1.example".into()),
            mac: Some(MacAddr([0x02, 0x6d, 0x0a, 0x64, 0x00, 0x05])),
            address: Some(Ipv4Net { addr: Ipv4Addr::new(10, 100, 0, 5), prefix: 24 }),
            gateway: Some(Ipv4Addr::new(10, 100, 0, 1)),
            dns: vec![Ipv4Addr::new(10, 100, 0, 1), Ipv4Addr::new(9, 9, 9, 9)],
        };
        assert_eq!(plan.net, expected);
    }

    #[test]
    fn entropy_alone_changes_nothing_else() {
        let plan = Plan::parse(&identity()).unwrap();
        assert_eq!(plan.net, NetConfig::default());
        assert_eq!(plan.realtime, None);
        assert!(!plan.new_ssh_host_key);
        assert!(plan.ssh_keys.is_none(), "no ssh_keys: the server's stay");
        let locked = Plan::parse(&GuestIdentity { ssh_keys: Some(Vec::new()), ..identity() }).unwrap();
        assert_eq!(locked.ssh_keys.map(|keys| keys.len()), Some(0));
    }

    #[test]
    fn a_bad_field_refuses_the_whole_identity() {
        let refused = |identity: GuestIdentity| Plan::parse(&identity).err().expect("refused");
        let short = GuestIdentity::new(&[1; MIN_ENTROPY_BYTES - 1]);
        assert_eq!(refused(short), InvalidIdentity::Entropy(IdentityError::TooLittleEntropy { got: 31 }));
        for name in ["", "has space", "new\nline", "tab\there", "é", &"a".repeat(HOST_NAME_MAX + 1)] {
            let bad = GuestIdentity { hostname: Some(name.into()), ..identity() };
            assert_eq!(refused(bad), InvalidIdentity::Hostname(name.into()));
        }
        assert!(Plan::parse(&GuestIdentity { hostname: Some("a".repeat(HOST_NAME_MAX)), ..identity() }).is_ok());
        for (mac, why) in [
            ("02:6d:0a:64:00", MacError::Syntax),
            ("02:6d:0a:64:00:05:06", MacError::Syntax),
            ("02-6d-0a-64-00-05", MacError::Syntax),
            ("2:6d:a:64:0:5", MacError::Syntax),
            ("02:6d:0a:64:00:zz", MacError::Syntax),
            ("+2:6d:0a:64:00:05", MacError::Syntax),
            ("01:00:5e:00:00:01", MacError::NotUnicast),
            ("00:00:00:00:00:00", MacError::NotUnicast),
        ] {
            let bad = GuestIdentity { mac: Some(mac.into()), ..identity() };
            assert_eq!(refused(bad), InvalidIdentity::Mac(mac.into(), why), "{mac}");
        }
        for address in ["10.100.0.5", "10.100.0.5/33", "10.100.0/24", "10.100.0.5/", "::1/64"] {
            let bad = GuestIdentity { address: Some(address.into()), ..identity() };
            assert_eq!(refused(bad), InvalidIdentity::Address(address.into()));
        }
        let bad = GuestIdentity { gateway: Some("10.100.0.1/24".into()), ..identity() };
        assert_eq!(refused(bad), InvalidIdentity::Gateway("10.100.0.1/24".into()));
        let bad = GuestIdentity { dns: vec!["1.1.1.1".into(), "dns.example".into()], ..identity() };
        assert_eq!(refused(bad), InvalidIdentity::Dns("dns.example".into()));
        for line in ["garbage", "ssh-ed25519", "ssh-ed25519 AAAA", &key_line(3).replace("ssh-ed25519", "ssh-rsa")] {
            let bad = GuestIdentity { ssh_keys: Some(vec![key_line(1), line.into()]), ..identity() };
            assert!(matches!(refused(bad), InvalidIdentity::SshKeys(why) if why.contains("no public key")), "{line}");
        }
    }

    #[test]
    fn refusals_read_well() {
        let bad = GuestIdentity { mac: Some("01:00:5e:00:00:01".into()), ..identity() };
        assert_eq!(
            apply(&bad).unwrap_err(),
            "invalid identity: mac \"01:00:5e:00:00:01\": a multicast or all-zero address cannot be an interface's"
        );
        let short = GuestIdentity::new(&[1; 4]);
        assert_eq!(apply(&short).unwrap_err(), "invalid identity: 4 bytes of entropy are under the minimum of 32");
        let bad = GuestIdentity { ssh_keys: Some(vec!["ssh-ed25519 nope".into()]), ..identity() };
        assert_eq!(
            apply(&bad).unwrap_err(),
            "invalid identity: ssh_keys: no public key in authorized key line \"ssh-ed25519 nope\""
        );
    }
}
