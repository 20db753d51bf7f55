//! `mmctl snapshot create|ls|rm|gc`, `restore` and `suspend` against the
//! local broker (protocols/broker.capnp: `Vm.snapshot`, `Vm.suspend`,
//! `Broker.listSnapshots`, `removeSnapshot`, `restoreVm`).

use clap::Subcommand;
use mm_protocols::broker_capnp::broker;
pub use mm_protocols::snapshot_info::SnapshotInfo;

use crate::client::CliError;
use crate::output::{self, Format, VmInfo};

#[derive(Debug, Subcommand)]
pub enum SnapshotVerb {
    /// Snapshot a running microVM (it runs on); prints the snapshot's id.
    Create {
        vm: String,
        /// A name to find it by instead of its id.
        #[arg(long)]
        name: Option<String>,
    },
    /// List snapshots (of one microVM, if given).
    Ls { vm: Option<String> },
    /// Delete snapshots (by id, unique id prefix or name).
    Rm {
        #[arg(required = true)]
        snapshots: Vec<String>,
    },
    /// Delete a microVM's snapshots but the newest KEEP.
    Gc {
        vm: String,
        #[arg(long, default_value_t = 3)]
        keep: usize,
    },
}

fn mib(bytes: u64) -> String {
    format!("{:.1}M", bytes as f64 / f64::from(1 << 20))
}

/// `snapshot ls` (local, and `--server`'s table through the same rows).
pub fn print(snapshots: &[SnapshotInfo], format: Format) {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(snapshots).expect("serialisable")),
        Format::Table => {
            println!(
                "{:<14} {:<16} {:<16} {:<9} {:<25} {:>8} {:>9} {:>9}",
                "ID", "NAME", "VM", "KIND", "CREATED", "RAM", "SAVED", "ON DISK"
            );
            for s in snapshots {
                println!(
                    "{:<14} {:<16} {:<16} {:<9} {:<25} {:>7}M {:>9} {:>9}",
                    s.id,
                    s.name,
                    s.vm_name,
                    s.kind,
                    s.created_at,
                    s.memory_mib,
                    mib(s.memory_bytes),
                    mib(s.disk_bytes)
                );
            }
        }
    }
}

async fn list(broker: &broker::Client, vm: &str) -> Result<Vec<SnapshotInfo>, CliError> {
    let mut request = broker.list_snapshots_request();
    request.get().set_vm(vm);
    let reply = request.send().promise.await?;
    let mut all = Vec::new();
    for s in reply.get()?.get_snapshots()?.iter() {
        all.push(SnapshotInfo::read(s)?);
    }
    Ok(all)
}

async fn remove(broker: &broker::Client, id: &str) -> Result<(), CliError> {
    let mut request = broker.remove_snapshot_request();
    request.get().set_id(id);
    request.send().promise.await?;
    Ok(())
}

pub async fn run(broker: &broker::Client, verb: SnapshotVerb, format: Format) -> Result<i32, CliError> {
    match verb {
        SnapshotVerb::Create { vm, name } => {
            let vm = crate::get_vm(broker, &vm).await?;
            let mut request = vm.snapshot_request();
            request.get().set_name(name.as_deref().unwrap_or(""));
            let reply = request.send().promise.await?;
            let info = SnapshotInfo::read(reply.get()?.get_snapshot()?)?;
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&info).expect("serialisable")),
                Format::Table => println!("{}", info.id),
            }
            Ok(0)
        }
        SnapshotVerb::Ls { vm } => {
            print(&list(broker, vm.as_deref().unwrap_or("")).await?, format);
            Ok(0)
        }
        SnapshotVerb::Rm { snapshots } => {
            let mut failed = None;
            for id in snapshots {
                match remove(broker, &id).await {
                    Ok(()) => println!("{id}"),
                    Err(e) => {
                        eprintln!("mmctl: {}", e.message);
                        failed = Some(e.code);
                    }
                }
            }
            Ok(failed.unwrap_or(0))
        }
        SnapshotVerb::Gc { vm, keep } => {
            let mine: Vec<SnapshotInfo> =
                list(broker, &vm).await?.into_iter().filter(|s| s.kind == "snapshot").collect();
            let excess = mine.len().saturating_sub(keep);
            for old in &mine[..excess] {
                remove(broker, &old.id).await?;
                println!("{}", old.id);
            }
            Ok(0)
        }
    }
}

/// `mmctl restore SNAPSHOT`: a new microVM from it; prints its name.
pub async fn restore(
    broker: &broker::Client,
    snapshot: &str,
    name: Option<&str>,
    keys: &[String],
    format: Format,
) -> Result<i32, CliError> {
    let mut request = broker.restore_vm_request();
    request.get().set_snapshot(snapshot);
    request.get().set_name(name.unwrap_or(""));
    fill_texts(request.get().init_ssh_keys(keys.len() as u32), keys);
    let vm = request.send().promise.await?.get()?.get_vm()?;
    let info = crate::info(&vm).await?;
    match format {
        Format::Json => output::print_one(&info, format),
        Format::Table => println!("{}", info.name),
    }
    Ok(0)
}

/// Fills a Cap'n Proto text list (sized for `texts`): argv, SSH keys.
pub fn fill_texts(mut list: capnp::text_list::Builder<'_>, texts: &[String]) {
    for (i, text) in texts.iter().enumerate() {
        list.set(i as u32, text);
    }
}

/// `mmctl fork SNAPSHOT --count N`: one `forkVm` call; the broker checks
/// every name and the memory for all clones before it starts any.
pub async fn fork(
    broker: &broker::Client,
    snapshot: &str,
    count: u32,
    prefix: Option<&str>,
    keys: &[String],
    format: Format,
) -> Result<i32, CliError> {
    let mut request = broker.fork_vm_request();
    request.get().set_snapshot(snapshot);
    request.get().set_count(count);
    request.get().set_name_prefix(prefix.unwrap_or(""));
    fill_texts(request.get().init_ssh_keys(keys.len() as u32), keys);
    let reply = request.send().promise.await?;
    let mut clones = Vec::new();
    for vm in reply.get()?.get_vms()?.iter() {
        clones.push(crate::info(&vm?).await?);
    }
    match format {
        Format::Json => output::print_list(&clones, format),
        Format::Table => clones.iter().for_each(|c| println!("{}", c.name)),
    }
    Ok(0)
}

/// `mmctl branch VM [--name COPY]`.
pub async fn branch(broker: &broker::Client, vm: &str, name: Option<&str>, format: Format) -> Result<i32, CliError> {
    let source = crate::get_vm(broker, vm).await?;
    let mut request = source.branch_request();
    request.get().set_name(name.unwrap_or(""));
    let copy = request.send().promise.await?.get()?.get_vm()?;
    let info = crate::info(&copy).await?;
    match format {
        Format::Json => output::print_one(&info, format),
        Format::Table => println!("{}", info.name),
    }
    Ok(0)
}

/// `mmctl suspend VM`.
pub async fn suspend(broker: &broker::Client, vm: &str, format: Format) -> Result<i32, CliError> {
    let vm = crate::get_vm(broker, vm).await?;
    let reply = vm.suspend_request().send().promise.await?;
    let info = VmInfo::read(reply.get()?.get_info()?)?;
    match format {
        Format::Json => output::print_one(&info, format),
        Format::Table => println!("{}", info.name),
    }
    Ok(0)
}
