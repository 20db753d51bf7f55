//! Our side of the comparison: the mm-vmm command, the kernel command line
//! it gives the guest (so QEMU can be given the very same one), and the
//! figures mm-vmm logs on stderr.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use mm_integration::guest::Boot;

use crate::BootConfig;

/// The mm-vmm invocation for one benchmark boot.
pub fn command(config: &BootConfig) -> Result<Command> {
    command_with_devices(config, std::iter::empty())
}

/// The same with virtio devices: `(kind, socket)` of running `mm-device`s,
/// in guest order.
pub fn command_with_devices<'a>(
    config: &BootConfig,
    devices: impl IntoIterator<Item = (&'a str, &'a Path)>,
) -> Result<Command> {
    let mut boot = Boot::new(&[]).cpus(config.cpus);
    for (kind, socket) in devices {
        boot = boot.device(kind, socket);
    }
    boot.memory_mib = config.memory_mib;
    boot.extra_cmdline = config.extra_cmdline.clone();
    boot.command = config.workload.clone();
    let mut cmd = boot.command()?;
    // tracing colours its fields; plain text is easier to parse.
    cmd.env("NO_COLOR", "1");
    Ok(cmd)
}

/// The full kernel command line mm-vmm builds for `config`, assembled with
/// mm-vmm's own function from the same parts in the same order as
/// `mm_vmm::vm::Vm::build`, so that QEMU boots with exactly the same one.
/// (The bench also checks the line each guest kernel prints.)
pub fn kernel_cmdline(config: &BootConfig) -> Result<String> {
    let bootdev = format!("mm.bootdev={:#x}", mm_vmm::layout::BOOT_DEVICE_START);
    let pvm = if mm_vmm::pvm::host_is_pvm() { mm_vmm::pvm::PVM_CMDLINE } else { "" };
    let cmd = if config.workload.is_empty() {
        String::new()
    } else {
        format!("mm.cmd={}", mm_vmm::vm::encode_command(&config.workload))
    };
    let parts = [mm_vmm::vm::BASE_CMDLINE, &bootdev, pvm, &config.extra_cmdline, &cmd];
    let cmdline = mm_vmm::boot::build_cmdline(&parts)?;
    let cstring = cmdline.as_cstring().map_err(|e| anyhow::anyhow!("kernel command line: {e}"))?;
    cstring.into_string().context("kernel command line is not UTF-8")
}

/// Removes ANSI escape sequences (`ESC [ ... letter`), in case colours are
/// on despite NO_COLOR.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The value of `key=` on the first log line containing `message`, without
/// quotes (tracing quotes string fields: `since_start_ms="12.3"`).
fn log_field<'a>(log: &'a str, message: &str, key: &str) -> Option<&'a str> {
    let line = log.lines().find(|l| l.contains(message))?;
    let needle = format!("{key}=");
    let start = line
        .match_indices(&needle)
        .map(|(i, _)| i)
        .find(|&i| i == 0 || !line.as_bytes()[i - 1].is_ascii_alphanumeric() && line.as_bytes()[i - 1] != b'_')?
        + needle.len();
    let value = line[start..].trim_start_matches('"');
    let end = value.find(|c: char| c == '"' || c.is_whitespace()).unwrap_or(value.len());
    Some(&value[..end])
}

/// What mm-vmm's stderr says about one boot.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LogFigures {
    /// CLOCK_MONOTONIC (ns) at vCPU 0's first KVM_RUN.
    pub first_kvm_run_monotonic_ns: Option<u64>,
    /// mm-vmm's own start → first KVM_RUN (ms), from inside the process.
    pub first_kvm_run_since_start_ms: Option<f64>,
    /// The boot timer: mm-vmm's start → mm-init's write to the boot device.
    pub boot_timer_ms: Option<f64>,
}

pub fn parse_log(stderr: &str) -> LogFigures {
    let log = strip_ansi(stderr);
    LogFigures {
        first_kvm_run_monotonic_ns: log_field(&log, "first KVM_RUN", "monotonic_ns").and_then(|v| v.parse().ok()),
        first_kvm_run_since_start_ms: log_field(&log, "first KVM_RUN", "since_start_ms").and_then(|v| v.parse().ok()),
        boot_timer_ms: log_field(&log, "guest user space started", "since_start_ms").and_then(|v| v.parse().ok()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
\u{1b}[2m2025-01-01T00:00:00.000001Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m PVM host detected: filtering CPUID
\u{1b}[2m2025-01-01T00:00:00.004000Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m \u{1b}[2mmonotonic_ns\u{1b}[0m\u{1b}[2m=\u{1b}[0m14230000123456 \u{1b}[3msince_start_ms\u{1b}[0m\u{1b}[2m=\u{1b}[0m\"3.21\" first KVM_RUN
2025-01-01T00:01:14.000000Z  INFO guest user space started since_start_ms=\"74012.5\"
";

    #[test]
    fn strips_colours() {
        assert_eq!(strip_ansi("\u{1b}[2mab\u{1b}[0mc"), "abc");
        assert_eq!(strip_ansi("plain"), "plain");
    }

    #[test]
    fn parses_the_log_figures() {
        let f = parse_log(LOG);
        assert_eq!(f.first_kvm_run_monotonic_ns, Some(14_230_000_123_456));
        assert_eq!(f.first_kvm_run_since_start_ms, Some(3.21));
        assert_eq!(f.boot_timer_ms, Some(74012.5));
    }

    #[test]
    fn missing_lines_give_none() {
        assert_eq!(parse_log("nothing here"), LogFigures::default());
    }

    #[test]
    fn field_names_match_whole_words() {
        let line = "x_monotonic_ns=1 monotonic_ns=2 first KVM_RUN";
        assert_eq!(log_field(line, "first KVM_RUN", "monotonic_ns"), Some("2"));
    }

    #[test]
    fn cmdline_has_our_parts_and_the_workload() {
        let config =
            BootConfig { cpus: 1, memory_mib: 128, extra_cmdline: "quiet".into(), workload: vec!["true".into()] };
        let line = kernel_cmdline(&config).unwrap();
        assert!(line.starts_with(mm_vmm::vm::BASE_CMDLINE));
        assert!(line.contains("mm.bootdev=0xc0000000"));
        assert!(line.contains(" quiet "));
        assert!(line.ends_with(&format!("mm.cmd={}", mm_vmm::vm::encode_command(&config.workload))));
    }
}
