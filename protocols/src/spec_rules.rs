//! Rules the broker, the controller and `mmctl` must agree on about a
//! microVM's spec and the names and ids they hand each other: what a name
//! and an id may be, what a public key line looks like, and how much of
//! the guest's kernel command line a workload may take.
//!
//! **Names and ids.** They end up in paths, URLs, the guest's hostname,
//! and, through `mmctl ssh`, in `ssh_config` lines and a `ProxyCommand`
//! that a shell runs: so each side checks them, also `mmctl` on what the
//! broker or the controller sends back.
//!
//! **The kernel command line.** The broker hands mm-init the workload's
//! environment (`mm.env`) and SSH keys (`mm.ssh`), and through mm-vmm its
//! argv (`mm.cmd`), as kernel parameters, each a base64url (no padding)
//! JSON list of strings (guest/init/src/settings.rs). The x86 kernel keeps
//! `COMMAND_LINE_SIZE` = 2048 bytes of its command line, the NUL included,
//! and mm-vmm refuses to boot a longer one; so the broker and the
//! controller refuse, at create, a workload whose three parameters take
//! more than [`WORKLOAD_CMDLINE_MAX`] bytes. The rest,
//! `KERNEL_CMDLINE_MAX - WORKLOAD_CMDLINE_MAX` = 647 bytes, is for what
//! does not depend on the workload; at most 559 of them are used today:
//! mm-vmm's own (`BASE_CMDLINE` 45, ` mm.bootdev=…` 22, four
//! ` virtio_mmio.device=…` of 35, the PVM parameters 96), the broker's
//! (` quiet root=… mm.hostname=` 67 and a 63-character name, ` mm.wait` 8,
//! ` mm.ip=…/32 mm.gw=…` 47, three name servers 55) and the default
//! command (` mm.cmd=WyJzaCJd`, 16). The unit test below adds them up.

use base64::Engine;

/// The longest guest kernel command line: x86's `COMMAND_LINE_SIZE`
/// (2048, as our guest kernel is built) less its NUL.
pub const KERNEL_CMDLINE_MAX: usize = 2047;

/// The most a workload's `mm.cmd`, `mm.env` and `mm.ssh` parameters may
/// take of it together (each with its leading space and `mm.X=`).
pub const WORKLOAD_CMDLINE_MAX: usize = 1400;

/// Whether `name` is a microVM (or snapshot) name as the broker accepts
/// it: 1 to 63 ASCII letters, digits, '-' or '_', starting with a letter
/// or digit. Every controller machine name ([`is_dns_label`]) and every id
/// is one too.
pub fn is_vm_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= 63
        && bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Whether `name` is a DNS label as the controller accepts it for
/// namespaces, machines and hosts: 1 to 63 lowercase letters, digits or
/// '-', not starting or ending with '-'.
pub fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Whether `id` is a broker's microVM id: lowercase hex digits (the broker
/// makes 12; up to 64 are taken, so longer ones need no new clients).
pub fn is_vm_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether `line` is an OpenSSH public key line: a key type OpenSSH
/// knows, base64 data, an optional comment, all on one line. (Options
/// before the type, as authorized_keys allows, are not taken.)
pub fn is_ssh_public_key(line: &str) -> bool {
    const TYPES: [&str; 4] = ["ssh-ed25519", "ssh-rsa", "ecdsa-sha2-", "sk-"];
    let mut words = line.split_ascii_whitespace();
    let (kind, data) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let base64 = |c: char| c.is_ascii_alphanumeric() || "+/=".contains(c);
    TYPES.iter().any(|t| kind.starts_with(t))
        && !data.is_empty()
        && data.chars().all(base64)
        && !line.chars().any(char::is_control)
}

/// A list of strings as a kernel parameter's value: base64url, no
/// padding, of its JSON (what mm-init decodes).
pub fn encode_string_list<S: AsRef<str>>(items: &[S]) -> String {
    let items: Vec<&str> = items.iter().map(AsRef::as_ref).collect();
    let json = serde_json::to_vec(&items).expect("strings always serialise");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
}

/// What one parameter ` mm.X=<list>` takes; none for an empty list.
fn param_len<S: AsRef<str>>(param: &str, items: &[S]) -> usize {
    if items.is_empty() { 0 } else { 1 + param.len() + 1 + encode_string_list(items).len() }
}

/// The bytes a workload's parameters take on the guest's kernel command
/// line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkloadSize {
    /// ` mm.cmd=…` (none for an empty command: the image's default).
    pub command: usize,
    /// ` mm.env=…`, the variables as `NAME=VALUE`.
    pub env: usize,
    /// ` mm.ssh=…`.
    pub ssh_keys: usize,
}

impl WorkloadSize {
    pub fn of<'a>(
        command: &[String],
        env: impl IntoIterator<Item = (&'a str, &'a str)>,
        ssh_keys: &[String],
    ) -> WorkloadSize {
        let env: Vec<String> = env.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
        WorkloadSize {
            command: param_len("mm.cmd", command),
            env: param_len("mm.env", &env),
            ssh_keys: param_len("mm.ssh", ssh_keys),
        }
    }

    pub fn total(&self) -> usize {
        self.command + self.env + self.ssh_keys
    }
}

/// A workload too large for the guest's kernel command line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the command, environment and SSH keys take {total} bytes of the guest's kernel command line \
     (command {command}, environment {env}, SSH keys {keys}; base64url-encoded JSON), more than the \
     {WORKLOAD_CMDLINE_MAX} bytes they may use of its {KERNEL_CMDLINE_MAX}: pass less, and put large \
     values in the image or a file",
    total = .0.total(), command = .0.command, env = .0.env, keys = .0.ssh_keys
)]
pub struct WorkloadTooLarge(pub WorkloadSize);

/// Refuses a workload whose parameters would not fit the guest's kernel
/// command line (see the module's documentation).
pub fn check_workload<'a>(
    command: &[String],
    env: impl IntoIterator<Item = (&'a str, &'a str)>,
    ssh_keys: &[String],
) -> Result<WorkloadSize, WorkloadTooLarge> {
    let size = WorkloadSize::of(command, env, ssh_keys);
    if size.total() > WORKLOAD_CMDLINE_MAX { Err(WorkloadTooLarge(size)) } else { Ok(size) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn names() {
        for good in ["web-1", "a", "A_b", "0e5c2a4e-3b7a-4a43-9a7e-0c1f6a1d2b3c", &"a".repeat(63)] {
            assert!(is_vm_name(good), "{good:?}");
        }
        for bad in ["", "-x", "_x", "a b", "../etc", "a.b", "a\nb", "a;b", "$(x)", "é", &"a".repeat(64)] {
            assert!(!is_vm_name(bad), "{bad:?}");
        }
        assert!(is_dns_label("prod-1") && is_dns_label("0") && is_dns_label(&"x".repeat(63)));
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "a\n", &"x".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad:?}");
        }
    }

    #[test]
    fn ids() {
        assert!(is_vm_id("0123456789ab") && is_vm_id(&"f".repeat(64)));
        for bad in ["", "0123456789AB", "12345g", "ab cd", "ab;cd", &"a".repeat(65)] {
            assert!(!is_vm_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn public_keys() {
        assert!(is_ssh_public_key("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGs= me@host"));
        assert!(is_ssh_public_key("ecdsa-sha2-nistp256 AAAAE2VjZHNh"));
        for bad in [
            "",
            "hello",
            "ssh-ed25519",
            "ssh-ed25519 not*base64",
            "-----BEGIN OPENSSH PRIVATE KEY-----",
            "root:$6$salt$hash:19000:0:99999:7:::",
            "ssh-ed25519 AAAA a\rb",
            "command=\"x\" ssh-ed25519 AAAA",
        ] {
            assert!(!is_ssh_public_key(bad), "{bad:?}");
        }
    }

    #[test]
    fn sizes_are_the_encoded_parameters() {
        let command = strings(&["sh", "-c", "echo hi"]);
        let size = WorkloadSize::of(&command, [("A", "1")], &[]);
        assert_eq!(size.command, format!(" mm.cmd={}", encode_string_list(&command)).len());
        assert_eq!(size.env, format!(" mm.env={}", encode_string_list(&["A=1"])).len());
        assert_eq!(size.ssh_keys, 0);
        assert_eq!(WorkloadSize::of(&[], [], &[]).total(), 0);
        // base64url without padding: ["sh"] is 6 bytes, 8 encoded.
        assert_eq!(encode_string_list(&["sh"]), "WyJzaCJd");
    }

    #[test]
    fn the_limit_is_on_the_sum() {
        // One byte of value is one JSON byte (ASCII), 4/3 encoded.
        let fits = "x".repeat(1000);
        assert!(check_workload(&[], [("A", fits.as_str())], &[]).is_ok());
        let too_much = "x".repeat(70 * 1024);
        let e = check_workload(&[], [("A", too_much.as_str())], &[]).unwrap_err();
        let message = e.to_string();
        assert!(message.contains(&e.0.total().to_string()) && message.contains("1400"), "{message}");
        // Each part fits alone, not all three together.
        let part = vec!["y".repeat(500)];
        assert!(check_workload(&part, [], &[]).is_ok());
        assert!(check_workload(&part, [("B", part[0].as_str())], &part).is_err());
        // Exactly at the limit is fine; one byte more is not.
        let at = |n: usize| WorkloadSize::of(&[], [("A", "z".repeat(n).as_str())], &[]).total();
        let n = (0..2000).find(|&n| at(n) >= WORKLOAD_CMDLINE_MAX).unwrap();
        let value = "z".repeat(n);
        let result = check_workload(&[], [("A", value.as_str())], &[]);
        assert_eq!(result.is_ok(), at(n) == WORKLOAD_CMDLINE_MAX);
        let value = "z".repeat(n + 1);
        assert!(check_workload(&[], [("A", value.as_str())], &[]).is_err());
    }

    /// The worst case of everything else on the line (see the module's
    /// documentation), spelled out: with a workload at the limit, the whole
    /// line still fits.
    #[test]
    fn the_rest_of_the_line_fits_beside_it() {
        let vmm = [
            "console=ttyS0 reboot=k panic=1 no_timer_check".to_string(),
            " mm.bootdev=0xc0000000".to_string(),
            " virtio_mmio.device=4K@0xc0001000:5".repeat(4),
            " mm_pvm noxsave clearcpuid=cx16,popcnt,smap,erms,fsrm,rep_good rcupdate.rcu_cpu_stall_suppress=1"
                .to_string(),
        ];
        let broker = [
            format!(" quiet root=/dev/vda ro init=/init mm.overlay=/dev/vdb mm.hostname={}", "n".repeat(63)),
            " mm.wait".to_string(),
            " mm.ip=255.255.255.255/32 mm.gw=255.255.255.255".to_string(),
            " mm.dns=255.255.255.255,255.255.255.255,255.255.255.255".to_string(),
            format!(" mm.cmd={}", encode_string_list(&["sh"])),
        ];
        let rest: usize = vmm.iter().chain(&broker).map(String::len).sum();
        assert_eq!(rest, 559);
        assert!(rest + WORKLOAD_CMDLINE_MAX <= KERNEL_CMDLINE_MAX);
    }
}
