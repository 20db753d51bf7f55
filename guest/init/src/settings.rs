//! mm-init's settings, read from the kernel command line.
//!
//! mm-vmm passes everything as `mm.*` parameters. Values that may hold
//! spaces or quotes (the command, its environment) are base64url-encoded JSON,
//! because the kernel's command-line parser only understands double quotes and
//! would split or mangle anything else.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// What PID 1 should do, as decoded from `/proc/cmdline`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The workload's argv; `/bin/sh` when the VMM gave none.
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

impl Settings {
    /// Parses the whole kernel command line; parameters that are not ours
    /// are ignored.
    pub fn parse(cmdline: &str) -> Result<Self, SettingsError> {
        let mut settings = Settings {
            command: vec!["/bin/sh".to_string()],
            env: Vec::new(),
            boot_device: None,
            hostname: None,
            overlay: None,
        };
        for word in cmdline.split_ascii_whitespace() {
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
    }
}
