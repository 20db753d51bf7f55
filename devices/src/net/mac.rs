//! MAC addresses as the broker spells them (`02:00:0a:00:00:05`).

use std::fmt;
use std::str::FromStr;

/// An Ethernet MAC address, the one the guest finds in the virtio-net config
/// space (VIRTIO_NET_F_MAC) and uses as its source address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

/// A MAC address that is not six colon-separated hex octets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad MAC address {0:?}: expected six hex octets separated by ':'")]
pub struct BadMac(pub String);

impl MacAddr {
    /// True for multicast (and broadcast) addresses, which a NIC must not use
    /// as its own address.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl FromStr for MacAddr {
    type Err = BadMac;

    fn from_str(s: &str) -> Result<Self, BadMac> {
        let bad = || BadMac(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in out.iter_mut() {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let mac: MacAddr = "02:00:0A:00:00:ff".parse().unwrap();
        assert_eq!(mac.0, [2, 0, 0x0a, 0, 0, 0xff]);
        assert_eq!(mac.to_string(), "02:00:0a:00:00:ff");
        assert!(!mac.is_multicast());
        assert!("ff:ff:ff:ff:ff:ff".parse::<MacAddr>().unwrap().is_multicast());
    }

    #[test]
    fn rejects_malformed() {
        for s in
            ["", "02:00:0a:00:00", "02:00:0a:00:00:05:06", "2:00:0a:00:00:05", "02:00:0a:00:00:zz", "02-00-0a-00-00-05"]
        {
            assert!(s.parse::<MacAddr>().is_err(), "{s}");
        }
    }
}
