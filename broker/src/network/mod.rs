//! The microVMs' network on this host (DESIGN.md, "Networking"): a bridge
//! with the guests' gateway address, one persistent TAP per microVM on it,
//! addresses from [`ipam`], and egress NAT with nftables when an uplink is
//! configured.
//!
//! By default the bridge lives in a network namespace the broker creates
//! (`ip netns add`), so guests reach each other and nothing else: the
//! host's own namespace has no route to them, and `mmctl ssh` and
//! `mmctl port-forward` reach them through the broker, which connects from
//! inside that namespace ([`netns::Namespace::connect`]). A host may opt
//! into a bridge in the broker's own namespace instead, which makes guests
//! reachable from (and able to reach) the host.
//!
//! With an uplink, a namespaced bridge gets a veth pair to the host (a
//! small transit network), guest traffic is masqueraded twice (in the
//! namespace onto the transit address, on the host onto the uplink), and
//! an input rule on the host drops anything from the transit link that is
//! not a reply, so egress does not open the host itself to guests.
//!
//! Every TAP is guarded ([`guard`]): a guest sends only from its own MAC
//! and IPv4 address, so it cannot take a neighbour's address (and the
//! connections the broker opens to it).
//!
//! Interfaces and rules are made with `ip` and `nft`, as an admin would
//! type them, and every step is idempotent: a restarted broker runs the
//! same set-up over what the last one left.

pub mod guard;
pub mod ipam;
pub mod netns;

use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};

pub use guard::Tap;
use ipam::Ipv4Net;
use netns::Namespace;

/// The namespace side of the uplink veth pair.
const NS_UPLINK: &str = "uplink0";
/// How long a restarted net device waits for its predecessor's TAP fd.
const TAP_BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("no free address left in {0}")]
    Full(Ipv4Net),
    #[error("not a valid {what}: {value:?}")]
    Invalid { what: &'static str, value: String },
}

/// How the host wants its microVM network (mm-broker's `--network-*` flags).
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    /// The guests' network; its first address is the bridge's (the gateway).
    pub cidr: Ipv4Net,
    /// The named namespace (`/run/netns/NAME`) that holds the bridge, or
    /// `None` for a bridge in the broker's own namespace (the opt-in).
    pub netns: Option<String>,
    pub bridge: String,
    /// The host interface egress leaves by; no uplink, no egress.
    pub uplink: Option<String>,
    /// A /30 for the veth pair between a namespaced bridge and the host.
    pub transit: Ipv4Net,
    /// Name servers written to the guests' `/etc/resolv.conf`.
    pub dns: Vec<Ipv4Addr>,
}

/// The network, set up.
#[derive(Debug, Clone)]
pub struct Network {
    pub config: NetworkConfig,
    namespace: Namespace,
}

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, NetworkError> {
    let command = format!("{program} {}", args.join(" "));
    let io = |what: &str| {
        let what = format!("{what} `{command}`");
        move |source| NetworkError::Io { what, source }
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io("running"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).map_err(io("writing to"))?;
    }
    let out = child.wait_with_output().map_err(io("waiting for"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(NetworkError::Command { command, stderr });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// FNV-1a, for short interface and table names derived from the namespace's.
fn short_hash(text: &str) -> String {
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    format!("{:08x}", hash as u32)
}

impl Network {
    /// Creates (or finds) the namespace, bridge, uplink and NAT rules.
    pub fn setup(config: NetworkConfig) -> Result<Network, NetworkError> {
        let namespace = match &config.netns {
            Some(name) => {
                let path = format!("/run/netns/{name}");
                if !std::path::Path::new(&path).exists() {
                    run("ip", &["netns", "add", name], None)?;
                }
                Namespace::at(path)
            }
            None => Namespace::own(),
        };
        guard::check_ifname(&config.bridge)?;
        let network = Network { config, namespace };
        network.ip(&["link", "set", "lo", "up"])?;
        // Before any port can join the bridge (a restart keeps the elements).
        network.setup_guard()?;
        let bridge = network.config.bridge.as_str();
        if network.ip(&["link", "show", bridge]).is_err() {
            network.ip(&["link", "add", bridge, "type", "bridge"])?;
        }
        let gateway = format!("{}/{}", network.config.cidr.gateway(), network.config.cidr.prefix);
        network.ip(&["addr", "replace", &gateway, "dev", bridge])?;
        network.ip(&["link", "set", bridge, "up"])?;
        if let Some(uplink) = network.config.uplink.clone() {
            network.setup_egress(&uplink)?;
        }
        Ok(network)
    }

    pub fn namespace(&self) -> &Namespace {
        &self.namespace
    }

    /// `ip` in the bridge's namespace.
    fn ip(&self, args: &[&str]) -> Result<String, NetworkError> {
        match &self.config.netns {
            Some(name) => run("ip", &[&["-n", name.as_str()], args].concat(), None),
            None => run("ip", args, None),
        }
    }

    /// `nft -f -` with `script`, in the bridge's namespace or the broker's.
    fn nft(&self, in_bridge_namespace: bool, script: &str) -> Result<(), NetworkError> {
        match (&self.config.netns, in_bridge_namespace) {
            (Some(name), true) => run("ip", &["netns", "exec", name, "nft", "-f", "-"], Some(script)),
            _ => run("nft", &["-f", "-"], Some(script)),
        }
        .map(drop)
    }

    fn enable_forwarding(&self, in_bridge_namespace: bool) -> Result<(), NetworkError> {
        let args = ["sysctl", "-qw", "net.ipv4.ip_forward=1"];
        match (&self.config.netns, in_bridge_namespace) {
            (Some(name), true) => run("ip", &[&["netns", "exec", name.as_str()], &args[..]].concat(), None),
            _ => run(args[0], &args[1..], None),
        }
        .map(drop)
    }

    fn guard_table(&self) -> String {
        guard::table_name(self.config.netns.as_deref(), &self.config.bridge)
    }

    /// The anti-spoofing table: chains replaced, elements kept; made anew
    /// if what is there cannot be kept.
    fn setup_guard(&self) -> Result<(), NetworkError> {
        let (table, every_port) = (self.guard_table(), self.config.netns.is_some());
        self.nft(true, &guard::table_script(&table, every_port)).or_else(|e| {
            tracing::warn!("replacing the anti-spoofing table {table}: {e}");
            self.nft(true, &guard::replace_table_script(&table, every_port))
        })
    }

    /// Makes `taps` (the microVMs a restarted broker re-adopted) the only
    /// ones the anti-spoofing table lets send, in one transaction.
    pub fn sync_guards(&self, taps: &[Tap]) -> Result<(), NetworkError> {
        self.nft(true, &guard::sync_script(&self.guard_table(), taps)?)
    }

    /// The table in the broker's namespace, one per network so two brokers
    /// on a host do not replace each other's rules.
    fn host_table(&self) -> String {
        format!("micromachines_{}", short_hash(self.config.netns.as_deref().unwrap_or(&self.config.bridge)))
    }

    fn setup_egress(&self, uplink: &str) -> Result<(), NetworkError> {
        let cidr = format!("{}/{}", self.config.cidr.network(), self.config.cidr.prefix);
        let table = self.host_table();
        let Some(netns) = self.config.netns.clone() else {
            // Bridge on the host: masquerade the guests onto the uplink.
            self.enable_forwarding(false)?;
            return self.nft(false, &masquerade_table(&table, &cidr, uplink, None));
        };
        let transit = &self.config.transit;
        let host_end = Ipv4Addr::from(u32::from(transit.network()) + 1);
        let ns_end = Ipv4Addr::from(u32::from(transit.network()) + 2);
        let veth = format!("mmv{}", short_hash(&netns));
        if run("ip", &["link", "show", &veth], None).is_err() {
            run("ip", &["link", "add", &veth, "type", "veth", "peer", "name", NS_UPLINK, "netns", &netns], None)?;
        }
        run("ip", &["addr", "replace", &format!("{host_end}/{}", transit.prefix), "dev", &veth], None)?;
        run("ip", &["link", "set", &veth, "up"], None)?;
        self.ip(&["addr", "replace", &format!("{ns_end}/{}", transit.prefix), "dev", NS_UPLINK])?;
        self.ip(&["link", "set", NS_UPLINK, "up"])?;
        self.ip(&["route", "replace", "default", "via", &host_end.to_string()])?;
        // In the namespace: guests leave as the transit address.
        self.enable_forwarding(true)?;
        self.nft(true, &masquerade_table("micromachines", &cidr, NS_UPLINK, None))?;
        // On the host: the transit address leaves as the uplink's, and the
        // host itself answers nothing that the transit link starts.
        let transit_net = format!("{}/{}", transit.network(), transit.prefix);
        self.enable_forwarding(false)?;
        self.nft(false, &masquerade_table(&table, &transit_net, uplink, Some(&veth)))
    }

    /// The TAP name of a microVM: `mm` + its 12-digit id (14 characters,
    /// under the kernel's 15).
    pub fn tap_name(vm_id: &str) -> String {
        format!("mm{}", &vm_id[..vm_id.len().min(12)])
    }

    /// Opens the microVM's TAP (creating it on first use), lets it send from
    /// its own MAC and address only ([`guard`]), then puts it on the bridge
    /// and up.
    ///
    /// A single-queue TAP takes one fd at a time (EBUSY otherwise). When a
    /// net device process is killed, its jailed half (which holds the TAP)
    /// dies a moment after the process the broker watches, so a restart
    /// waits up to [`TAP_BUSY_WAIT`] for the old fd to go.
    pub fn open_tap(&self, tap: &Tap) -> Result<OwnedFd, NetworkError> {
        let script = guard::add_script(&self.guard_table(), std::slice::from_ref(tap))?;
        let name = tap.name.as_str();
        let deadline = std::time::Instant::now() + TAP_BUSY_WAIT;
        let fd = loop {
            match self.namespace.open_tap(name) {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                result => break result,
            }
        }
        .map_err(|source| NetworkError::Io { what: format!("opening TAP {name}"), source })?;
        self.nft(true, &script)?;
        self.ip(&["link", "set", name, "master", &self.config.bridge])?;
        self.ip(&["link", "set", name, "up"])?;
        Ok(fd)
    }

    /// Deletes a microVM's TAP (when it stops: a new start makes a new one)
    /// and then its anti-spoofing element.
    pub fn remove_tap(&self, tap: &Tap) {
        if let Err(e) = self.ip(&["link", "del", &tap.name]) {
            tracing::debug!("removing TAP {}: {e}", tap.name);
        }
        if let Err(e) = guard::remove_script(&self.guard_table(), tap).and_then(|script| self.nft(true, &script)) {
            tracing::warn!("removing TAP {}'s anti-spoofing element: {e}", tap.name);
        }
    }

    /// A free address and its MAC, given every address records hold.
    pub fn allocate(&self, used: &[Ipv4Addr]) -> Result<(Ipv4Addr, String), NetworkError> {
        let ip = ipam::allocate(&self.config.cidr, used).ok_or(NetworkError::Full(self.config.cidr))?;
        Ok((ip, ipam::mac_for(ip)))
    }

    /// mm-init's kernel parameters for a guest at `ip`.
    pub fn guest_params(&self, ip: Ipv4Addr) -> String {
        let mut params = format!(" mm.ip={ip}/{} mm.gw={}", self.config.cidr.prefix, self.config.cidr.gateway());
        if !self.config.dns.is_empty() {
            let list: Vec<String> = self.config.dns.iter().map(Ipv4Addr::to_string).collect();
            params.push_str(&format!(" mm.dns={}", list.join(",")));
        }
        params
    }
}

/// An nftables table that masquerades `source` leaving by `uplink`; with
/// `guarded`, also drops what arrives on that interface for the host itself
/// unless it answers a connection the host made.
fn masquerade_table(table: &str, source: &str, uplink: &str, guarded: Option<&str>) -> String {
    // Declaring then deleting the table makes the script replace it in one
    // transaction, whether it existed or not.
    let mut script = format!(
        "table ip {table} {{}}\ndelete table ip {table}\ntable ip {table} {{\n\
         \tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {source} oifname \"{uplink}\" masquerade\n\t}}\n"
    );
    if let Some(link) = guarded {
        script.push_str(&format!(
            "\tchain input {{\n\t\ttype filter hook input priority filter; policy accept;\n\
             \t\tiifname \"{link}\" ct state established,related accept\n\
             \t\tiifname \"{link}\" drop\n\t}}\n"
        ));
    }
    script.push_str("}\n");
    script
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_the_kernel_limit() {
        let name = Network::tap_name("0123456789ab");
        assert_eq!(name, "mm0123456789ab");
        assert!(name.len() < libc::IFNAMSIZ);
    }

    #[test]
    fn masquerade_rules_name_the_source_and_uplink() {
        let script = masquerade_table("t", "10.0.0.0/24", "eth9", Some("mmv1"));
        assert!(script.starts_with("table ip t {}\ndelete table ip t\n"));
        assert!(script.contains("ip saddr 10.0.0.0/24 oifname \"eth9\" masquerade"));
        assert!(script.contains("iifname \"mmv1\" drop"));
        assert!(!masquerade_table("t", "s", "u", None).contains("drop"));
    }

    #[test]
    fn short_hashes_are_stable_and_differ() {
        assert_eq!(short_hash("a"), short_hash("a"));
        assert_ne!(short_hash("mm-a"), short_hash("mm-b"));
        assert_eq!(short_hash("x").len(), 8);
    }
}
