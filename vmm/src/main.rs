//! `mm-vmm`: boot one microVM and exit with its workload's status.
//!
//! Exit status: the workload's (0–255, 128+N for a signal) when mm-init
//! reported one; 125 when mm-vmm itself failed (bad input, KVM error, a
//! guest the hypervisor could not run) or the guest reset without a status.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use mm_vmm::devices::serial::SerialOutput;
use mm_vmm::endpoint::Endpoint;
use mm_vmm::pvm::PvmMode;
use mm_vmm::vm::DeviceSpec;
use mm_vmm::{Vm, VmConfig, VmOutcome};

/// Status for "mm-vmm failed", as `docker run` uses 125 for its own errors.
const VMM_FAILURE: u8 = 125;

#[derive(Debug, Parser)]
#[command(name = "mm-vmm", version, about = "Boot one MicroMachines microVM")]
struct Args {
    /// Guest kernel: an ELF vmlinux or a bzImage.
    #[arg(long)]
    kernel: PathBuf,
    /// Initramfs (newc cpio, optionally compressed) to use as the root.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Extra kernel parameters, appended to mm-vmm's own.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    memory_mib: u64,
    /// Where the serial console goes: `stdout`, `none`, or a file path.
    #[arg(long, default_value = "stdout")]
    serial: SerialOutput,
    /// Apply the PVM host adjustments: auto-detected by default.
    #[arg(long, value_enum, default_value_t = PvmMode::Auto)]
    pvm: PvmMode,
    /// Debugging aid: sample vCPU 0's guest RIP every millisecond and write
    /// a histogram here at exit.
    #[arg(long)]
    profile_guest: Option<PathBuf>,
    /// A virtio device served by a vhost-user back end: `KIND=SOCKET` with
    /// KIND block, net or vsock. Repeatable; the guest sees them in order.
    #[arg(long = "device", value_name = "KIND=SOCKET")]
    devices: Vec<DeviceSpec>,
    /// The control channel (`reconnect INDEX [SOCKET]`): a socket path to
    /// serve, or `fd:N`, an inherited connected socket (the broker's).
    #[arg(long, value_name = "PATH|fd:N")]
    control: Option<Endpoint>,
    /// The workload for mm-init to run, after `--`.
    #[arg(last = true)]
    command: Vec<String>,
}

fn main() -> ExitCode {
    let start = Instant::now();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("MM_LOG").unwrap_or_else(|_| "mm_vmm=info".into()))
        .with_target(false)
        .init();
    let args = Args::parse();
    let config = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        extra_cmdline: args.cmdline,
        command: args.command,
        cpus: args.cpus,
        memory_mib: args.memory_mib,
        serial: args.serial,
        pvm: args.pvm,
        profile_guest: args.profile_guest,
        devices: args.devices,
        control_socket: args.control,
    };
    let outcome = Vm::build(&config, start).and_then(Vm::run);
    match outcome {
        Ok(VmOutcome::Exited(status)) => ExitCode::from(u8::try_from(status).unwrap_or(VMM_FAILURE)),
        Ok(VmOutcome::ResetWithoutStatus) => {
            eprintln!(
                "mm-vmm: the guest reset without reporting an exit status (kernel panic, or an init other than mm-init)"
            );
            ExitCode::from(VMM_FAILURE)
        }
        Err(e) => {
            eprintln!("mm-vmm: {e}");
            ExitCode::from(VMM_FAILURE)
        }
    }
}
