//! Stress reproduction (ignored by default): real `mm-device block`
//! processes SIGKILLed at random moments while a simulated driver keeps
//! requests in flight. Every request must complete exactly once, within
//! [`MAX_AGE`] of its submission, correctly (status, data read back), every
//! completed write must be on disk, nothing may be pending at the end, and
//! the back ends must have resubmitted requests from the in-flight table
//! (each process is asked over its control channel before it is killed).
//!
//! `cargo build --workspace --bins && STRESS_KILLS=200 cargo test -p mm-devices --features test-hooks --lib block::tests::stress -- --ignored --nocapture`
//!
//! Two drivers: [`stress_kill_real_processes`] with the back end completing
//! in order (as it does in production), and
//! [`stress_kill_real_processes_out_of_order`], whose back ends complete
//! each batch newest first (`--test-complete-out-of-order`), so a kill lands
//! between completions and restarting at the used index alone would lose
//! and repeat requests. `STRESS_NO_INFLIGHT=1` makes the driver not
//! negotiate INFLIGHT_SHMFD, to see that failure happen.
//! `STRESS_INDIRECT=1` sends every request as an indirect table.
//!
//! Every other back end runs with `--test-request-delay-ms 1`, and the
//! out-of-order ones with `--test-complete-out-of-order`: `mm-device` flags
//! of the cargo feature `test-hooks`, which `cargo build --workspace` turns
//! on (through mm-integration). This module is compiled only with the
//! feature (as `cargo test --workspace` has it, by the same unification).

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mm_protocols::device_control::{DeviceClient, SeqPacketListener};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vm_memory::{Address, Bytes, GuestAddress};

use super::*;
use crate::test_frontend::{Buf, TEST_PROTOCOL_FEATURES, TestFrontend, TestMemory, UsedElem};

const QSIZE: u16 = 64;
const SLOTS: usize = 12;
const BLOCK: usize = 4096;
const SECTORS_PER_BLOCK: u64 = (BLOCK / 512) as u64;
const BLOCKS: u64 = 512;
/// The longest a request may stay pending. Killed back ends are replaced
/// within milliseconds and resubmit at once, so only a lost request gets
/// near this (a slow, loaded host included).
const MAX_AGE: Duration = Duration::from_secs(10);
/// The fd number the device's control listener is inherited at.
const CONTROL_FD: i32 = 64;

struct Slot {
    itable: GuestAddress,
    hdr: GuestAddress,
    data: GuestAddress,
    status: GuestAddress,
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    slot: usize,
    write: bool,
    block: u64,
    seq: u64,
    submitted: Instant,
}

fn fill(seq: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK];
    for (i, chunk) in v.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64).to_le_bytes());
    }
    v
}

/// One `mm-device block` process and its control socket.
struct Device {
    child: Child,
    control: PathBuf,
}

impl Device {
    /// Requests this process resubmitted for its predecessor.
    fn resubmitted(&self) -> u64 {
        let client = DeviceClient::connect(&self.control, TIMEOUT).expect("the device's control socket");
        client.status().expect("the device's status").counters.resubmitted
    }

    /// SIGKILLs the process that serves: the jailed copy our child runs
    /// (which PDEATHSIG would kill too, but only after our child's exit,
    /// by when a short batch of requests has long completed), then our
    /// child.
    fn kill(&mut self) {
        let pid = self.child.id();
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        for jailed in children.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            // SAFETY: kill(2) on our child's child, which cannot be reaped
            // (and its pid reused) while our child, its parent, lives.
            unsafe { libc::kill(jailed, libc::SIGKILL) };
        }
        // SAFETY: kill(2) on our own, not yet reaped, child.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        self.child.wait().unwrap();
    }
}

#[allow(clippy::zombie_processes)] // the caller kills and reaps it
fn spawn_device(dir: &Path, n: usize, image: &Path, extra: &[&str]) -> (Device, UnixStream) {
    let bin = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/debug/mm-device");
    let socket = dir.join(format!("s{n}.sock"));
    let control = dir.join(format!("c{n}.sock"));
    let _ = std::fs::remove_file(&socket);
    let listener = SeqPacketListener::bind(&control).unwrap();
    let listener_fd = listener.as_fd().as_raw_fd();
    let mut command = Command::new(bin);
    command
        .arg("block")
        .arg("--socket")
        .arg(&socket)
        .arg("--image")
        .arg(image)
        .arg("--control-fd")
        .arg(CONTROL_FD.to_string())
        .args(extra)
        .stdin(Stdio::null());
    // SAFETY: only dup2, which is async-signal-safe, between fork and exec;
    // the copy it makes does not have CLOEXEC.
    unsafe {
        command.pre_exec(move || {
            if libc::dup2(listener_fd, CONTROL_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().unwrap();
    drop(listener); // the device's copy is the only one
    let start = Instant::now();
    loop {
        if let Ok(s) = UnixStream::connect(&socket) {
            return (Device { child, control }, s);
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{bin} {extra:?} exited ({status}) instead of serving; is it built with the test-hooks \
                 feature (cargo build --workspace --bins)?"
            );
        }
        assert!(start.elapsed() < TIMEOUT, "device socket never appeared");
        std::thread::sleep(Duration::from_millis(2));
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// What the simulated driver knows: requests outstanding and what the
/// disk must hold.
struct Driver {
    slots: Vec<Slot>,
    free_slots: Vec<usize>,
    pending: HashMap<u16, Pending>,
    busy_blocks: HashSet<u64>,
    /// block -> seq of its last completed write.
    written: HashMap<u64, u64>,
    completed: u64,
    errors: Vec<String>,
}

impl Driver {
    /// Checks and retires completions.
    fn complete(&mut self, fe: &TestFrontend, used: Vec<UsedElem>, kills: usize) {
        for u in used {
            let head = u.id as u16;
            let Some(p) = self.pending.remove(&head) else {
                self.errors.push(format!("used element for head {head} which is not outstanding (kills {kills})"));
                continue;
            };
            self.completed += 1;
            let s = &self.slots[p.slot];
            let status: u8 = fe.mem().read_obj(s.status).unwrap();
            if status != S_OK {
                self.errors.push(format!("{p:?} head {head}: status {status:#x} (kills {kills})"));
            }
            if p.write {
                self.written.insert(p.block, p.seq);
            } else {
                let mut got = vec![0u8; BLOCK];
                fe.mem().read_slice(&mut got, s.data).unwrap();
                if got != fill(self.written[&p.block]) {
                    self.errors.push(format!("{p:?} head {head}: read wrong data (kills {kills})"));
                }
            }
            self.busy_blocks.remove(&p.block);
            self.free_slots.push(p.slot);
        }
    }

    /// Fails on any request pending longer than [`MAX_AGE`]: one a back
    /// end lost, while others keep completing.
    fn check_ages(&mut self, kills: usize) {
        let oldest = self.pending.iter().max_by_key(|(_, p)| p.submitted.elapsed());
        if let Some((head, p)) = oldest
            && p.submitted.elapsed() > MAX_AGE
        {
            self.errors.push(format!(
                "head {head} ({p:?}) pending for {:?}: lost (kills {kills}, {} pending)",
                p.submitted.elapsed(),
                self.pending.len()
            ));
        }
    }
}

#[test]
#[ignore]
fn stress_kill_real_processes() {
    stress(false);
}

#[test]
#[ignore]
fn stress_kill_real_processes_out_of_order() {
    stress(true);
}

fn stress(out_of_order: bool) {
    let rounds: usize = std::env::var("STRESS_KILLS").ok().and_then(|s| s.parse().ok()).unwrap_or(200);
    let name = if out_of_order { "ooo" } else { "ordered" };
    let dir = std::env::temp_dir().join(format!("mm-blk-stress-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("data.img");
    std::fs::File::create(&image).unwrap().set_len(BLOCKS * BLOCK as u64).unwrap();
    // Every other process is slowed down (1 ms before each request, and
    // between out-of-order completions) so that kills reliably find
    // requests in flight; the others serve at full speed.
    let extra = |n: usize| -> &'static [&'static str] {
        match (out_of_order, n % 2 == 1) {
            (false, false) => &[],
            (false, true) => &["--test-request-delay-ms", "1"],
            (true, false) => &["--test-complete-out-of-order"],
            (true, true) => &["--test-complete-out-of-order", "--test-request-delay-ms", "1"],
        }
    };

    let (mut device, stream) = spawn_device(&dir, 0, &image, extra(0));
    let memory = TestMemory::new(MEM_BASE, MEM_SIZE).unwrap();
    let mut wanted = TEST_PROTOCOL_FEATURES;
    if std::env::var("STRESS_NO_INFLIGHT").is_ok() {
        wanted.remove(VhostUserProtocolFeatures::INFLIGHT_SHMFD);
    }
    let mut fe = TestFrontend::connect_wanting(stream, memory, 1, wanted).unwrap();
    fe.activate(u64::MAX, &[QSIZE]).unwrap();

    let slots: Vec<Slot> = (0..SLOTS)
        .map(|_| Slot {
            itable: fe.alloc(48).unwrap(),
            hdr: fe.alloc(16).unwrap(),
            data: fe.alloc(BLOCK as u64).unwrap(),
            status: fe.alloc(1).unwrap(),
        })
        .collect();
    let indirect = std::env::var("STRESS_INDIRECT").is_ok();
    let reserved = if indirect { fe.reserve_descs(0, usize::from(QSIZE)).unwrap() } else { Vec::new() };
    let _ = reserved;
    let mut d = Driver {
        slots,
        free_slots: (0..SLOTS).collect(),
        pending: HashMap::new(),
        busy_blocks: HashSet::new(),
        written: HashMap::new(),
        completed: 0,
        errors: Vec::new(),
    };
    let mut rng = Rng(0x1234_5678 ^ u64::from(std::process::id()));
    let mut seq = 0u64;
    let mut kills = 0usize;
    let mut resubmitted = 0u64;
    let mut next_kill = Instant::now() + Duration::from_millis(20);

    while kills < rounds && d.errors.is_empty() {
        let kill_now = Instant::now() >= next_kill;
        if kill_now {
            // What this process resubmitted for its predecessor, asked
            // before the kick so the round trip does not delay the kill.
            resubmitted += device.resubmitted();
        }
        // Submit until the slots run out.
        let mut submitted = false;
        while let Some(slot) = d.free_slots.pop() {
            let read = rng.next().is_multiple_of(3) && !d.written.is_empty();
            let block = if read {
                let keys: Vec<u64> = d.written.keys().copied().filter(|b| !d.busy_blocks.contains(b)).collect();
                if keys.is_empty() {
                    d.free_slots.push(slot);
                    break;
                }
                keys[(rng.next() % keys.len() as u64) as usize]
            } else {
                let mut b = rng.next() % BLOCKS;
                while d.busy_blocks.contains(&b) {
                    b = (b + 1) % BLOCKS;
                }
                b
            };
            seq += 1;
            let s = &d.slots[slot];
            fe.mem().write_slice(&header(if read { T_IN } else { T_OUT }, block * SECTORS_PER_BLOCK), s.hdr).unwrap();
            let data = if read { vec![0xaau8; BLOCK] } else { fill(seq) };
            fe.mem().write_slice(&data, s.data).unwrap();
            fe.mem().write_obj(STATUS_UNTOUCHED, s.status).unwrap();
            let bufs = [
                Buf::out(s.hdr, 16),
                if read { Buf::input(s.data, BLOCK as u32) } else { Buf::out(s.data, BLOCK as u32) },
                Buf::input(s.status, 1),
            ];
            let head = if indirect {
                use crate::test_frontend::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, Desc};
                for (i, b) in bufs.iter().enumerate() {
                    let last = i + 1 == bufs.len();
                    let desc = s.itable.unchecked_add(16 * i as u64);
                    fe.mem().write_obj(b.addr.0.to_le(), desc).unwrap();
                    fe.mem().write_obj(b.len.to_le(), desc.unchecked_add(8)).unwrap();
                    let flags = if b.device_writes { DESC_F_WRITE } else { 0 } | if last { 0 } else { DESC_F_NEXT };
                    fe.mem().write_obj(flags.to_le(), desc.unchecked_add(12)).unwrap();
                    fe.mem().write_obj((i as u16 + 1).to_le(), desc.unchecked_add(14)).unwrap();
                }
                // Linux-like: the lowest free head is reused first.
                let head = slot as u16;
                fe.write_desc(0, head, Desc { addr: s.itable.0, len: 48, flags: DESC_F_INDIRECT, next: 0 }).unwrap();
                fe.push_avail(0, head).unwrap();
                head
            } else {
                fe.add_chain(0, &bufs).unwrap()
            };
            d.busy_blocks.insert(block);
            let new = Pending { slot, write: !read, block, seq, submitted: Instant::now() };
            if let Some(old) = d.pending.insert(head, new) {
                d.errors.push(format!("head {head} reused while {old:?} is outstanding (kills {kills})"));
            }
            submitted = true;
        }
        if submitted {
            fe.kick(0).unwrap();
        }
        // Sometimes kill right after kicking, mid-batch.
        if kill_now {
            let spin = Instant::now() + Duration::from_micros(rng.next() % 400);
            while Instant::now() < spin {}
            device.kill();
            kills += 1;
            let (next, s) = spawn_device(&dir, kills, &image, extra(kills));
            device = next;
            fe.reconnect(s).unwrap();
            next_kill = Instant::now() + Duration::from_millis(1 + rng.next() % 15);
        }
        // Collect completions.
        let used = fe.take_used(0).unwrap();
        if used.is_empty() {
            let _ = fe.wait_call(0, Duration::from_millis(1));
        }
        d.complete(&fe, used, kills);
        d.check_ages(kills);
    }
    // Drain: everything outstanding completes, or the age check fails it.
    while !d.pending.is_empty() && d.errors.is_empty() {
        let used = fe.wait_used(0, 1, Duration::from_millis(100)).unwrap();
        d.complete(&fe, used, kills);
        d.check_ages(kills);
    }
    // Nothing trickles in after the last completion either.
    std::thread::sleep(Duration::from_millis(100));
    let late = fe.take_used(0).unwrap();
    d.complete(&fe, late, kills);
    if !d.pending.is_empty() && d.errors.is_empty() {
        d.errors.push(format!("{} requests still pending at the end: {:?}", d.pending.len(), d.pending));
    }
    resubmitted += device.resubmitted();
    let file = std::fs::read(&image).unwrap();
    for (&block, &s) in &d.written {
        let at = block as usize * BLOCK;
        if file[at..at + BLOCK] != fill(s)[..] {
            d.errors.push(format!("block {block}: image does not hold write seq {s}"));
        }
    }
    device.kill();
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "stress ({name}): {kills} kills, {} completions, {resubmitted} resubmitted, {} still pending",
        d.completed,
        d.pending.len()
    );
    assert!(d.errors.is_empty(), "{:#?}", d.errors);
    assert!(d.pending.is_empty());
    assert!(resubmitted > 0, "{kills} kills and no back end resubmitted a request from the in-flight table");
}
