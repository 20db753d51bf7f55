//! Address management: each microVM's IPv4 address and MAC.
//!
//! The allocation is persisted through the microVM records themselves:
//! every record (running or stopped) holds its address, records are saved
//! before anything starts, and a restarted broker reads them all before it
//! allocates again. So an address is never given out twice, survives a
//! broker restart, and is free again only once its microVM is removed
//! (its record deleted).

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 network or interface address with its prefix, e.g. `10.100.0.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Net {
    fn mask(&self) -> u32 {
        if self.prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(self.prefix)) }
    }

    /// The network address (host bits cleared).
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }

    /// The first host address: the bridge's, the guests' gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network()) + 1)
    }

    /// Host addresses for guests: all but the network, gateway and broadcast.
    fn guest_range(&self) -> std::ops::RangeInclusive<u32> {
        let first = u32::from(self.network());
        let last = first | !self.mask();
        (first + 2)..=(last - 1)
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not an IPv4 network like 10.100.0.0/24 with a prefix of /8 to /29")]
pub struct BadNetwork(pub String);

impl FromStr for Ipv4Net {
    type Err = BadNetwork;
    fn from_str(s: &str) -> Result<Self, BadNetwork> {
        let bad = || BadNetwork(s.to_string());
        let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        // Narrower than /29 leaves no room for guests; wider than /8 is a typo.
        if !(8..=29).contains(&prefix) {
            return Err(bad());
        }
        Ok(Ipv4Net { addr: addr.parse().map_err(|_| bad())?, prefix })
    }
}

/// The lowest guest address of `cidr` that no one in `used` holds.
pub fn allocate(cidr: &Ipv4Net, used: &[Ipv4Addr]) -> Option<Ipv4Addr> {
    cidr.guest_range().map(Ipv4Addr::from).find(|ip| !used.contains(ip))
}

/// A locally administered unicast MAC derived from the address, so it is
/// unique wherever the address is: `02:6d:` + the four octets.
pub fn mac_for(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("02:6d:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_rejects_networks() {
        let n = net("10.100.0.7/24");
        assert_eq!(n.network(), Ipv4Addr::new(10, 100, 0, 0));
        assert_eq!(n.gateway(), Ipv4Addr::new(10, 100, 0, 1));
        assert!(n.contains(Ipv4Addr::new(10, 100, 0, 255)));
        assert!(!n.contains(Ipv4Addr::new(10, 100, 1, 0)));
        for bad in ["10.0.0.0", "10.0.0.0/30", "10.0.0.0/7", "10.0.0/24", "x/24", "10.0.0.0/abc"] {
            assert!(bad.parse::<Ipv4Net>().is_err(), "{bad}");
        }
    }

    #[test]
    fn allocates_the_lowest_free_guest_address_and_never_the_gateway() {
        let n = net("10.100.0.0/29");
        let a = allocate(&n, &[]).unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 100, 0, 2));
        let mut used = vec![a];
        while let Some(ip) = allocate(&n, &used) {
            assert!(!used.contains(&ip));
            used.push(ip);
        }
        // .2 to .6: the network (.0), gateway (.1) and broadcast (.7) are never given out.
        assert_eq!(used.len(), 5);
        assert_eq!(*used.last().unwrap(), Ipv4Addr::new(10, 100, 0, 6));
        // Freeing one (its microVM removed) makes exactly that one free again.
        used.retain(|ip| *ip != Ipv4Addr::new(10, 100, 0, 4));
        assert_eq!(allocate(&n, &used), Some(Ipv4Addr::new(10, 100, 0, 4)));
    }

    #[test]
    fn macs_follow_addresses() {
        assert_eq!(mac_for(Ipv4Addr::new(10, 100, 0, 2)), "02:6d:0a:64:00:02");
    }
}
