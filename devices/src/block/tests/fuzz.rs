//! Runs the fuzz entry point over deterministic pseudo-random inputs, so
//! stable CI exercises it without cargo-fuzz. Half the inputs are random
//! bytes; half are built to look like chains (addresses in guest memory,
//! plausible headers) so the deeper paths get reached.

use crate::block::fuzzing::{MEM_BASE, MEM_SIZE, fuzz_block_request};

fn random_input(rng: &mut fastrand::Rng) -> Vec<u8> {
    let len = rng.u64(0..512) as usize;
    (0..len).map(|_| rng.u64(..) as u8).collect()
}

/// A chain-shaped input: a descriptor table at the start of memory whose
/// descriptors point at a header and buffers further in.
fn chain_input(rng: &mut fastrand::Rng) -> Vec<u8> {
    let queue_size_shift = rng.u64(0..6) as u8;
    let queue_size = 1u64 << queue_size_shift;
    let head = rng.u64(0..queue_size + 2) as u8;
    let mut mem = vec![0u8; 4096];
    let n = 1 + rng.u64(0..5);
    for i in 0..queue_size.min(16) {
        let base = (i * 16) as usize;
        let addr = match rng.u64(0..10) {
            0 => rng.u64(..),
            1 => MEM_BASE + MEM_SIZE as u64 - rng.u64(0..64),
            _ => MEM_BASE + 1024 + rng.u64(0..3072),
        };
        let len = match rng.u64(0..4) {
            0 => 16,
            1 => 1,
            2 => 512 * rng.u64(0..3) as u32 as u64,
            _ => rng.u64(0..600),
        } as u32;
        let mut flags = 0u16;
        if i + 1 < n {
            flags |= 1;
        }
        if rng.u64(0..2) == 0 {
            flags |= 2;
        }
        if rng.u64(0..16) == 0 {
            flags |= 4;
        }
        let next = if rng.u64(0..8) == 0 { rng.u64(0..64) as u16 } else { (i + 1) as u16 };
        mem[base..base + 8].copy_from_slice(&addr.to_le_bytes());
        mem[base + 8..base + 12].copy_from_slice(&len.to_le_bytes());
        mem[base + 12..base + 14].copy_from_slice(&flags.to_le_bytes());
        mem[base + 14..base + 16].copy_from_slice(&next.to_le_bytes());
    }
    // Plausible headers everywhere in the buffer area.
    const TYPES: [u32; 8] = [0, 1, 4, 8, 11, 13, 2, 0xdead];
    for at in (1024..4096).step_by(16) {
        let kind = TYPES[rng.u64(0..8) as usize];
        let sector = if rng.u64(0..4) == 0 { rng.u64(..) } else { rng.u64(0..140) };
        mem[at..at + 4].copy_from_slice(&kind.to_le_bytes());
        mem[at + 8..at + 16].copy_from_slice(&sector.to_le_bytes());
    }
    let mut input = vec![queue_size_shift, head, rng.u64(0..4) as u8];
    input.extend(mem);
    input
}

#[test]
fn fuzz_entry_point_on_deterministic_inputs() {
    let mut rng = fastrand::Rng::with_seed(0x6d6d_626c_6f63_6b21);
    for i in 0..600 {
        let input = if i % 2 == 0 { random_input(&mut rng) } else { chain_input(&mut rng) };
        fuzz_block_request(&input);
    }
}
