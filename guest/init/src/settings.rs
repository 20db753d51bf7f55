//! mm-init's settings, read from the kernel command line.
//!
//! mm-vmm passes everything as `mm.*` parameters. Values that may hold
//! spaces or quotes (the command, its environment) are base64url-encoded JSON,
//! because the kernel's command-line parser only understands double quotes and
//! would split or mangle anything else.

use std::net::Ipv4Addr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The workload when nobody names one: no `mm.cmd`, or a handed-over
/// workload with an empty argv.
pub const DEFAULT_SHELL: &str = "/bin/sh";

/// What PID 1 should do, as decoded from `/proc/cmdline`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The workload's argv; [`DEFAULT_SHELL`] when the VMM gave none.
    pub command: Vec<String>,
    /// Extra environment for the workload, `KEY=VALUE`.
    pub env: Vec<String>,
    /// Guest-physical address of mm-vmm's boot device page, if any.
    pub boot_device: Option<u64>,
    /// Hostname to set.
    pub hostname: Option<String>,
    /// `mm.overlay=DEV`: the microVM's own writable disk, laid over the
    /// read-only root as an overlay (see overlay.rs).
    pub overlay: Option<String>,
    /// `mm.ip=ADDR/PREFIX`: eth0's address (see network.rs).
    pub address: Option<Ipv4Net>,
    /// `mm.gw=ADDR`: the default route.
    pub gateway: Option<Ipv4Addr>,
    /// `mm.dns=ADDR[,ADDR…]`: name servers for `/etc/resolv.conf`.
    pub dns: Vec<Ipv4Addr>,
    /// `mm.ssh=`: OpenSSH `authorized_keys` lines for mm-init's SSH server
    /// (base64url JSON, like `mm.cmd`). Public keys only: the command line
    /// is readable by every process in the guest.
    pub ssh_keys: Vec<String>,
    /// `mm.wait`: set up everything as usual, then wait for the workload
    /// from the host through the exec agent instead of running `command`
    /// (a warm start: see main.rs). `mm.cmd` and `mm.env` are then unused.
    pub wait: bool,
}

/// An IPv4 address with its prefix length, as in `10.200.0.5/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Net {
    /// The netmask, e.g. 255.255.255.0 for /24.
    pub fn netmask(&self) -> Ipv4Addr {
        let bits = if self.prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(self.prefix)) };
        Ipv4Addr::from(bits)
    }
}

impl std::str::FromStr for Ipv4Net {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let (addr, prefix) = s.split_once('/').ok_or(())?;
        let prefix: u8 = prefix.parse().map_err(|_| ())?;
        if prefix > 32 {
            return Err(());
        }
        Ok(Ipv4Net { addr: addr.parse().map_err(|_| ())?, prefix })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SettingsError {
    #[error("{param}: not valid base64url: {reason}")]
    Base64 { param: &'static str, reason: String },
    #[error("{param}: not a JSON array of strings: {reason}")]
    Json { param: &'static str, reason: String },
    #[error("mm.cmd: the command is empty")]
    EmptyCommand,
    #[error("mm.bootdev: not a hexadecimal address: {0:?}")]
    BootDevice(String),
    #[error("{param}: not an IPv4 address{suffix}: {value:?}")]
    Address { param: &'static str, suffix: &'static str, value: String },
    /// `mm.wait=…`: refused rather than ignored, so that `mm.wait=1` does
    /// not quietly run the command line's workload instead of waiting.
    #[error("mm.wait takes no value (got mm.wait={0})")]
    WaitValue(String),
}

fn decode_string_list(param: &'static str, value: &str) -> Result<Vec<String>, SettingsError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(value.trim_end_matches('='))
        .map_err(|e| SettingsError::Base64 { param, reason: e.to_string() })?;
    serde_json::from_slice(&bytes).map_err(|e| SettingsError::Json { param, reason: e.to_string() })
}

/// Encodes a list of strings the way [`Settings::parse`] expects it; mm-vmm
/// has its own copy of this one-liner so the guest and host crates stay apart.
#[cfg(test)]
pub fn encode_string_list(items: &[String]) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(items).expect("strings always serialise"))
}

fn parse_address<T: std::str::FromStr>(
    param: &'static str,
    suffix: &'static str,
    value: &str,
) -> Result<T, SettingsError> {
    value.parse().map_err(|_| SettingsError::Address { param, suffix, value: value.to_string() })
}

impl Settings {
    /// Parses the whole kernel command line; parameters that are not ours
    /// are ignored.
    pub fn parse(cmdline: &str) -> Result<Self, SettingsError> {
        let mut settings = Settings {
            command: vec![DEFAULT_SHELL.to_string()],
            env: Vec::new(),
            boot_device: None,
            hostname: None,
            overlay: None,
            address: None,
            gateway: None,
            dns: Vec::new(),
            ssh_keys: Vec::new(),
            wait: false,
        };
        for word in cmdline.split_ascii_whitespace() {
            // A flag, with no value: the kernel leaves it to us since its
            // name has a dot (it takes it for a module's parameter).
            if word == "mm.wait" {
                settings.wait = true;
                continue;
            }
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            match key {
                "mm.cmd" => {
                    settings.command = decode_string_list("mm.cmd", value)?;
                    if settings.command.is_empty() {
                        return Err(SettingsError::EmptyCommand);
                    }
                }
                "mm.env" => settings.env = decode_string_list("mm.env", value)?,
                "mm.bootdev" => {
                    let hex = value.trim_start_matches("0x");
                    let addr =
                        u64::from_str_radix(hex, 16).map_err(|_| SettingsError::BootDevice(value.to_string()))?;
                    settings.boot_device = Some(addr);
                }
                "mm.hostname" => settings.hostname = Some(value.to_string()),
                "mm.overlay" => settings.overlay = Some(value.to_string()),
                "mm.ip" => settings.address = Some(parse_address("mm.ip", "/PREFIX", value)?),
                "mm.gw" => settings.gateway = Some(parse_address("mm.gw", "", value)?),
                "mm.dns" => {
                    settings.dns =
                        value.split(',').map(|one| parse_address("mm.dns", "", one)).collect::<Result<_, _>>()?;
                }
                "mm.ssh" => settings.ssh_keys = decode_string_list("mm.ssh", value)?,
                "mm.wait" => return Err(SettingsError::WaitValue(value.to_string())),
                _ => {}
            }
        }
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_to_a_shell() {
        let s = Settings::parse("console=ttyS0 reboot=k").unwrap();
        assert_eq!(s.command, vec!["/bin/sh"]);
        assert_eq!(s.boot_device, None);
        assert!(!s.wait);
    }

    #[test]
    fn mm_wait_is_a_flag() {
        let cmd = encode_string_list(&["true".to_string()]);
        let s = Settings::parse(&format!("console=ttyS0 mm.wait mm.cmd={cmd} reboot=k")).unwrap();
        assert!(s.wait);
        assert_eq!(s.command, ["true"], "parsed all the same, though unused");
        for not_it in ["mm.waiting", "xmm.wait", "mm.wai", "mm.waiting=1"] {
            assert!(!Settings::parse(not_it).unwrap().wait, "{not_it}");
        }
        for value in ["1", "0", ""] {
            assert_eq!(Settings::parse(&format!("mm.wait={value}")), Err(SettingsError::WaitValue(value.into())));
        }
    }

    #[test]
    fn round_trips_a_command_with_spaces_and_quotes() {
        let cmd = vec!["sh".to_string(), "-c".to_string(), "echo 'a  b' \"c\"; exit 7".to_string()];
        let line = format!(
            "console=ttyS0 mm.cmd={} mm.bootdev=0xc0000000 mm.hostname=vm1 mm.overlay=/dev/vdb",
            encode_string_list(&cmd)
        );
        let s = Settings::parse(&line).unwrap();
        assert_eq!(s.command, cmd);
        assert_eq!(s.boot_device, Some(0xc000_0000));
        assert_eq!(s.overlay.as_deref(), Some("/dev/vdb"));
        assert_eq!(s.hostname.as_deref(), Some("vm1"));
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(Settings::parse("mm.cmd=!!!"), Err(SettingsError::Base64 { .. })));
        let not_json = URL_SAFE_NO_PAD.encode(b"{\"a\":1}");
        assert!(matches!(Settings::parse(&format!("mm.cmd={not_json}")), Err(SettingsError::Json { .. })));
        assert_eq!(Settings::parse(&format!("mm.cmd={}", encode_string_list(&[]))), Err(SettingsError::EmptyCommand));
        assert!(matches!(Settings::parse("mm.bootdev=zz"), Err(SettingsError::BootDevice(_))));
        assert!(matches!(Settings::parse("mm.ip=10.0.0.1"), Err(SettingsError::Address { .. })));
        assert!(matches!(Settings::parse("mm.ip=10.0.0.1/33"), Err(SettingsError::Address { .. })));
        assert!(matches!(Settings::parse("mm.dns=1.1.1.1,x"), Err(SettingsError::Address { .. })));
    }

    #[test]
    fn reads_the_network_and_ssh_keys() {
        let keys = vec!["ssh-ed25519 AAAAC3Nza test@host".to_string()];
        let line = format!(
            "mm.ip=10.200.0.5/24 mm.gw=10.200.0.1 mm.dns=10.200.0.1,9.9.9.9 mm.ssh={}",
            encode_string_list(&keys)
        );
        let s = Settings::parse(&line).unwrap();
        let net = s.address.unwrap();
        assert_eq!((net.addr, net.prefix), (Ipv4Addr::new(10, 200, 0, 5), 24));
        assert_eq!(net.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(s.gateway, Some(Ipv4Addr::new(10, 200, 0, 1)));
        assert_eq!(s.dns, vec![Ipv4Addr::new(10, 200, 0, 1), Ipv4Addr::new(9, 9, 9, 9)]);
        assert_eq!(s.ssh_keys, keys);
    }
}
