//! Stress reproduction (ignored by default): real `mm-device block`
//! processes SIGKILLed at random moments while a simulated driver keeps
//! requests in flight; every completion must be correct and every completed
//! write must be on disk.
//!
//! `cargo build --bins && cargo test -p mm-devices --lib block::tests::stress -- --ignored --nocapture`

use std::collections::{HashMap, HashSet};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vm_memory::{Address, Bytes, GuestAddress};

use super::*;
use crate::test_frontend::{Buf, TestFrontend, TestMemory};

const QSIZE: u16 = 64;
const SLOTS: usize = 12;
const BLOCK: usize = 4096;
const SECTORS_PER_BLOCK: u64 = (BLOCK / 512) as u64;
const BLOCKS: u64 = 512;

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
}

fn fill(seq: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK];
    for (i, chunk) in v.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64).to_le_bytes());
    }
    v
}

#[allow(clippy::zombie_processes)] // the caller kills and reaps it
fn spawn_device(dir: &std::path::Path, n: usize, image: &std::path::Path) -> (Child, UnixStream) {
    let bin = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/debug/mm-device");
    let socket = dir.join(format!("s{n}.sock"));
    let _ = std::fs::remove_file(&socket);
    let child = Command::new(bin)
        .arg("block")
        .arg("--socket")
        .arg(&socket)
        .arg("--image")
        .arg(image)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Ok(s) = UnixStream::connect(&socket) {
            return (child, s);
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

#[test]
#[ignore]
fn stress_kill_real_processes() {
    let rounds: usize = std::env::var("STRESS_KILLS").ok().and_then(|s| s.parse().ok()).unwrap_or(200);
    let dir = std::env::temp_dir().join(format!("mm-blk-stress-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("data.img");
    std::fs::File::create(&image).unwrap().set_len(BLOCKS * BLOCK as u64).unwrap();

    let (mut child, stream) = spawn_device(&dir, 0, &image);
    let memory = TestMemory::new(MEM_BASE, MEM_SIZE).unwrap();
    let mut fe = TestFrontend::connect(stream, memory, 1).unwrap();
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
    let mut free_slots: Vec<usize> = (0..SLOTS).collect();
    let mut pending: HashMap<u16, Pending> = HashMap::new();
    let mut busy_blocks: HashSet<u64> = HashSet::new();
    let mut written: HashMap<u64, u64> = HashMap::new(); // block -> seq of last completed write
    let mut rng = Rng(0x1234_5678 ^ u64::from(std::process::id()));
    let mut seq = 0u64;
    let mut completed = 0u64;
    let mut last_progress = Instant::now();
    let mut kills = 0usize;
    let mut next_kill = Instant::now() + Duration::from_millis(20);
    let mut errors = Vec::new();

    while kills < rounds && errors.is_empty() {
        // Submit until the slots run out.
        let mut submitted = false;
        while let Some(slot) = free_slots.pop() {
            let read = rng.next().is_multiple_of(3) && !written.is_empty();
            let block = if read {
                let keys: Vec<u64> = written.keys().copied().filter(|b| !busy_blocks.contains(b)).collect();
                if keys.is_empty() {
                    free_slots.push(slot);
                    break;
                }
                keys[(rng.next() % keys.len() as u64) as usize]
            } else {
                let mut b = rng.next() % BLOCKS;
                while busy_blocks.contains(&b) {
                    b = (b + 1) % BLOCKS;
                }
                b
            };
            seq += 1;
            let s = &slots[slot];
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
                    let d = s.itable.unchecked_add(16 * i as u64);
                    fe.mem().write_obj(b.addr.0.to_le(), d).unwrap();
                    fe.mem().write_obj(b.len.to_le(), d.unchecked_add(8)).unwrap();
                    let flags = if b.device_writes { DESC_F_WRITE } else { 0 } | if last { 0 } else { DESC_F_NEXT };
                    fe.mem().write_obj(flags.to_le(), d.unchecked_add(12)).unwrap();
                    fe.mem().write_obj((i as u16 + 1).to_le(), d.unchecked_add(14)).unwrap();
                }
                // Linux-like: the lowest free head is reused first.
                let head = slot as u16;
                fe.write_desc(0, head, Desc { addr: s.itable.0, len: 48, flags: DESC_F_INDIRECT, next: 0 }).unwrap();
                fe.push_avail(0, head).unwrap();
                head
            } else {
                fe.add_chain(0, &bufs).unwrap()
            };
            busy_blocks.insert(block);
            pending.insert(head, Pending { slot, write: !read, block, seq });
            submitted = true;
        }
        if submitted {
            fe.kick(0).unwrap();
        }
        // Sometimes kill right after kicking, mid-batch.
        if Instant::now() >= next_kill {
            let spin = Instant::now() + Duration::from_micros(rng.next() % 400);
            while Instant::now() < spin {}
            // SAFETY: kill(2) on our own, not yet reaped, child.
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            child.wait().unwrap();
            kills += 1;
            let (c, s) = spawn_device(&dir, kills, &image);
            child = c;
            fe.reconnect(s).unwrap();
            next_kill = Instant::now() + Duration::from_millis(1 + rng.next() % 15);
        }
        // Collect completions.
        let used = fe.take_used(0).unwrap();
        if used.is_empty() {
            let _ = fe.wait_call(0, Duration::from_millis(1));
            if last_progress.elapsed() > Duration::from_secs(5) {
                errors.push(format!("no progress for 5 s with {} pending (kills {kills})", pending.len()));
            }
            continue;
        }
        last_progress = Instant::now();
        for u in used {
            let head = u.id as u16;
            let Some(p) = pending.remove(&head) else {
                errors.push(format!("used element for head {head} which is not outstanding (kills {kills})"));
                continue;
            };
            completed += 1;
            let s = &slots[p.slot];
            let status: u8 = fe.mem().read_obj(s.status).unwrap();
            if status != S_OK {
                errors.push(format!("{p:?} head {head}: status {status:#x} (kills {kills})"));
            }
            if p.write {
                written.insert(p.block, p.seq);
            } else {
                let mut got = vec![0u8; BLOCK];
                fe.mem().read_slice(&mut got, s.data).unwrap();
                let want = fill(written[&p.block]);
                if got != want {
                    errors.push(format!("{p:?} head {head}: read wrong data (kills {kills})"));
                }
            }
            busy_blocks.remove(&p.block);
            free_slots.push(p.slot);
        }
    }
    // Drain.
    let deadline = Instant::now() + TIMEOUT;
    while !pending.is_empty() && Instant::now() < deadline && errors.is_empty() {
        for u in fe.wait_used(0, 1, Duration::from_millis(100)).unwrap() {
            if let Some(p) = pending.remove(&(u.id as u16))
                && p.write
            {
                written.insert(p.block, p.seq);
            }
        }
    }
    let file = std::fs::read(&image).unwrap();
    for (&block, &s) in &written {
        let at = block as usize * BLOCK;
        if file[at..at + BLOCK] != fill(s)[..] {
            errors.push(format!("block {block}: image does not hold write seq {s}"));
        }
    }
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("stress: {kills} kills, {completed} completions, {} still pending", pending.len());
    assert!(errors.is_empty(), "{errors:#?}");
}
