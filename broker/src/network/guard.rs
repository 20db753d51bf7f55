//! Anti-spoofing on every TAP: an nftables `bridge` table that lets a
//! guest send only from its own MAC and IPv4 address.
//!
//! One table per network (`micromachines_guard` in the broker's namespace
//! for the bridge), hooked at the bridge's `prerouting`, so it sees every
//! frame a guest sends, whether the bridge forwards it to another guest or
//! delivers it to the gateway (the broker's connections, egress). From a
//! guest's TAP it accepts only:
//!
//! * IPv4 whose Ethernet source, IPv4 source and TAP are one of the triples
//!   in the set `guests` (never from UDP port 67: no DHCP server),
//! * ARP requests and replies for Ethernet/IPv4 whose Ethernet source and
//!   ARP sender (MAC and address) are the TAP's triple,
//!
//! and drops everything else: other MACs or addresses, IPv6 (so no router
//! advertisements either), VLAN tags, any other ethertype. Frames to the
//! guests are not filtered here.
//!
//! A microVM's triple is one element, added in one transaction before its
//! TAP joins the bridge and deleted when the TAP is removed, both
//! idempotent. In a namespace of its own the bridge has only guest TAPs
//! as ports, and every port is filtered: a TAP without an element sends
//! nothing at all. A bridge in the broker's own namespace shares the
//! namespace (and nftables' bridge hooks) with whatever else the host
//! bridges, so there only the ports in the set `ports` are filtered (this
//! kernel has no `meta ibrname` to tell the bridges apart). Set-up
//! replaces the chains atomically and keeps the sets, and a restarted
//! broker then replaces the sets' contents with the microVMs it re-adopted
//! (one transaction), so the rules survive a broker restart and nothing
//! stale stays behind.
//!
//! Everything put into a script is validated first (interface names,
//! MACs) or typed ([`Ipv4Addr`]), so no input can change a rule.

use std::net::Ipv4Addr;

use super::NetworkError;

/// A microVM's TAP and the only source it may send from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tap {
    pub name: String,
    pub mac: String,
    pub ip: Ipv4Addr,
}

/// An interface name as the kernel takes it, limited to the characters
/// the broker's names use: 1 to 15 of `A-Z a-z 0-9 _ -`.
pub fn check_ifname(name: &str) -> Result<&str, NetworkError> {
    let ok = (1..libc::IFNAMSIZ).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok { Ok(name) } else { Err(NetworkError::Invalid { what: "interface name", value: name.to_string() }) }
}

/// A unicast, non-zero MAC written `xx:xx:xx:xx:xx:xx` (hex), lowercased.
pub fn check_mac(mac: &str) -> Result<String, NetworkError> {
    let bad = || NetworkError::Invalid { what: "MAC address", value: mac.to_string() };
    let octets: Vec<&str> = mac.split(':').collect();
    if octets.len() != 6 || octets.iter().any(|o| o.len() != 2 || !o.bytes().all(|b| b.is_ascii_hexdigit())) {
        return Err(bad());
    }
    let first = u8::from_str_radix(octets[0], 16).map_err(|_| bad())?;
    if first & 1 != 0 || octets.iter().all(|o| *o == "00") {
        return Err(bad());
    }
    Ok(mac.to_ascii_lowercase())
}

impl Tap {
    pub fn new(name: &str, mac: &str, ip: Ipv4Addr) -> Result<Tap, NetworkError> {
        Ok(Tap { name: check_ifname(name)?.to_string(), mac: check_mac(mac)?, ip })
    }

    /// Its `guests` and `ports` elements (checked again: the fields are public).
    fn elements(&self) -> Result<(String, String), NetworkError> {
        let name = check_ifname(&self.name)?;
        let mac = check_mac(&self.mac)?;
        Ok((format!("\"{name}\" . {mac} . {}", self.ip), format!("\"{name}\"")))
    }
}

/// The guard table's name: one per network, like the NAT tables.
pub fn table_name(netns: Option<&str>, bridge: &str) -> String {
    match netns {
        Some(_) => "micromachines_guard".to_string(),
        None => format!("micromachines_guard_{}", super::short_hash(bridge)),
    }
}

/// Creates the table and its sets if missing, and replaces its chains'
/// rules, in one transaction that keeps the sets' elements. With
/// `every_port`, every bridge port is filtered; otherwise only `ports`.
pub fn table_script(table: &str, every_port: bool) -> String {
    let t = format!("bridge {table}");
    let mut script = format!(
        "table {t} {{}}\n\
         add set {t} guests {{ type ifname . ether_addr . ipv4_addr; comment \"each microVM's TAP, MAC and IPv4 address\"; }}\n\
         add set {t} ports {{ type ifname; comment \"the TAPs of this broker's microVMs\"; }}\n\
         add chain {t} prerouting {{ type filter hook prerouting priority filter; policy accept; }}\n\
         add chain {t} guest_ipv4\n\
         add chain {t} guest_arp\n\
         flush chain {t} prerouting\n\
         flush chain {t} guest_ipv4\n\
         flush chain {t} guest_arp\n"
    );
    if !every_port {
        script.push_str(&format!("add rule {t} prerouting iifname != @ports return\n"));
    }
    script.push_str(&format!(
        "add rule {t} prerouting ether type vmap {{ ip : jump guest_ipv4, arp : jump guest_arp }}\n\
         add rule {t} prerouting counter drop comment \"not IPv4 or ARP (IPv6, VLAN, ...)\"\n\
         add rule {t} guest_ipv4 iifname . ether saddr . ip saddr != @guests counter drop comment \"spoofed MAC or IPv4 source\"\n\
         add rule {t} guest_ipv4 udp sport 67 counter drop comment \"DHCP server\"\n\
         add rule {t} guest_ipv4 accept\n\
         add rule {t} guest_arp arp htype 1 arp ptype ip arp hlen 6 arp plen 4 arp operation {{ request, reply }} \
         iifname . ether saddr . arp saddr ip @guests iifname . arp saddr ether . arp saddr ip @guests accept\n\
         add rule {t} guest_arp counter drop comment \"spoofed ARP\"\n"
    ));
    script
}

/// The same, over an existing table whose sets cannot be kept (made by
/// another version with other set types): replaced whole.
pub fn replace_table_script(table: &str, every_port: bool) -> String {
    format!("table bridge {table} {{}}\ndelete table bridge {table}\n{}", table_script(table, every_port))
}

/// Adds `taps`' elements (adding an element that exists is no error).
pub fn add_script(table: &str, taps: &[Tap]) -> Result<String, NetworkError> {
    if taps.is_empty() {
        return Ok(String::new());
    }
    let (guests, ports): (Vec<String>, Vec<String>) = taps.iter().map(Tap::elements).collect::<Result<_, _>>()?;
    Ok(format!(
        "add element bridge {table} guests {{ {} }}\nadd element bridge {table} ports {{ {} }}\n",
        guests.join(", "),
        ports.join(", ")
    ))
}

/// Deletes `tap`'s elements whether they exist or not (added first in the
/// same transaction, so the delete always finds them).
pub fn remove_script(table: &str, tap: &Tap) -> Result<String, NetworkError> {
    let (guest, port) = tap.elements()?;
    let mut script = add_script(table, std::slice::from_ref(tap))?;
    script.push_str(&format!(
        "delete element bridge {table} guests {{ {guest} }}\ndelete element bridge {table} ports {{ {port} }}\n"
    ));
    Ok(script)
}

/// Makes `taps` the sets' whole content, in one transaction.
pub fn sync_script(table: &str, taps: &[Tap]) -> Result<String, NetworkError> {
    let mut script = format!("flush set bridge {table} guests\nflush set bridge {table} ports\n");
    script.push_str(&add_script(table, taps)?);
    Ok(script)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tap(name: &str, mac: &str, ip: [u8; 4]) -> Tap {
        Tap { name: name.into(), mac: mac.into(), ip: Ipv4Addr::from(ip) }
    }

    #[test]
    fn names_and_macs_are_checked() {
        assert!(check_ifname("mm0123456789ab").is_ok());
        assert!(check_ifname("mmbr0").is_ok());
        for bad in ["", "mm0123456789abcd", "a\"b", "a b", "x;y", "a}", "mm\n", "é"] {
            assert!(check_ifname(bad).is_err(), "{bad:?}");
        }
        assert_eq!(check_mac("02:6D:0a:64:00:02").unwrap(), "02:6d:0a:64:00:02");
        for bad in [
            "",
            "02:6d:0a:64:00",
            "02:6d:0a:64:00:02:03",
            "02-6d-0a-64-00-02",
            "02:6d:0a:64:00:2",
            "02:6d:0a:64:00:0g",
            "+2:6d:0a:64:00:02",
            "03:6d:0a:64:00:02", // multicast
            "ff:ff:ff:ff:ff:ff",
            "00:00:00:00:00:00",
            "02:6d:0a:64:00:02 }",
        ] {
            assert!(check_mac(bad).is_err(), "{bad:?}");
        }
        assert!(Tap::new("mm1", "02:6d:0a:64:00:02", Ipv4Addr::new(10, 0, 0, 2)).is_ok());
        assert!(Tap::new("mm 1", "02:6d:0a:64:00:02", Ipv4Addr::new(10, 0, 0, 2)).is_err());
        assert!(Tap::new("mm1", "02:6d:0a:64:00:02\"", Ipv4Addr::new(10, 0, 0, 2)).is_err());
    }

    #[test]
    fn scripts_add_and_remove_one_element_each_idempotently() {
        let a = tap("mm0123456789ab", "02:6D:0A:64:00:02", [10, 100, 0, 2]);
        assert_eq!(
            add_script("g", std::slice::from_ref(&a)).unwrap(),
            "add element bridge g guests { \"mm0123456789ab\" . 02:6d:0a:64:00:02 . 10.100.0.2 }\n\
             add element bridge g ports { \"mm0123456789ab\" }\n"
        );
        let remove = remove_script("g", &a).unwrap();
        // Added then deleted in one transaction: no error when absent.
        let lines: Vec<&str> = remove.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].starts_with("add element bridge g guests"));
        assert_eq!(lines[2], "delete element bridge g guests { \"mm0123456789ab\" . 02:6d:0a:64:00:02 . 10.100.0.2 }");
        assert_eq!(lines[3], "delete element bridge g ports { \"mm0123456789ab\" }");
        assert_eq!(add_script("g", &[]).unwrap(), "");
        let b = tap("mm2", "02:6d:0a:64:00:03", [10, 100, 0, 3]);
        let sync = sync_script("g", &[a, b]).unwrap();
        assert!(sync.starts_with("flush set bridge g guests\nflush set bridge g ports\n"), "{sync}");
        assert!(sync.contains(
            "guests { \"mm0123456789ab\" . 02:6d:0a:64:00:02 . 10.100.0.2, \"mm2\" . 02:6d:0a:64:00:03 . 10.100.0.3 }"
        ));
        assert_eq!(sync_script("g", &[]).unwrap(), "flush set bridge g guests\nflush set bridge g ports\n");
    }

    #[test]
    fn bad_fields_never_reach_a_script() {
        for bad in [
            tap("mm1\" } ; flush ruleset", "02:6d:0a:64:00:02", [10, 0, 0, 2]),
            tap("mm1", "02:6d:0a:64:00:02 . 10.0.0.9", [10, 0, 0, 2]),
            tap("", "02:6d:0a:64:00:02", [10, 0, 0, 2]),
        ] {
            assert!(add_script("g", std::slice::from_ref(&bad)).is_err(), "{bad:?}");
            assert!(remove_script("g", &bad).is_err(), "{bad:?}");
            assert!(sync_script("g", &[bad]).is_err());
        }
    }

    #[test]
    fn the_table_keeps_its_sets_and_filters_every_port_only_in_a_namespace() {
        let script = table_script("micromachines_guard", true);
        assert!(script.starts_with("table bridge micromachines_guard {}\n"));
        // Sets are only added (kept), chains flushed and refilled.
        assert!(!script.contains("delete") && !script.contains("flush set"));
        assert!(script.contains("flush chain bridge micromachines_guard prerouting\n"));
        assert!(script.contains("type filter hook prerouting priority filter; policy accept;"));
        assert!(script.contains("ether type vmap { ip : jump guest_ipv4, arp : jump guest_arp }"));
        assert!(script.contains("iifname . ether saddr . ip saddr != @guests counter drop"));
        assert!(script.contains("udp sport 67 counter drop"));
        assert!(script.contains(
            "iifname . ether saddr . arp saddr ip @guests iifname . arp saddr ether . arp saddr ip @guests accept"
        ));
        assert!(!script.contains("@ports return"));
        assert!(table_script("t", false).contains("add rule bridge t prerouting iifname != @ports return\n"));
        let replace = replace_table_script("t", true);
        assert!(replace.starts_with("table bridge t {}\ndelete table bridge t\ntable bridge t {}\n"));
        assert_eq!(table_name(Some("micromachines"), "mmbr0"), "micromachines_guard");
        assert!(table_name(None, "mmbr0").starts_with("micromachines_guard_"));
        assert_ne!(table_name(None, "mmbr0"), table_name(None, "mmbr1"));
    }
}
