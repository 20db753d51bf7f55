//! A guest that hits an instruction the hypervisor cannot run must end
//! mm-vmm with an error naming the RIP, never hang it.
//!
//! The "kernel" here is a 121-byte ELF whose entry point is `int3` with
//! interrupts off. On PVM hosts the instruction emulator cannot run it
//! (PVM.md, row 4), so KVM reports an internal error. On hardware KVM the
//! guest has no IDT entry for it and triple-faults, which mm-vmm reports as
//! a reset without an exit status.

use std::process::Command;
use std::time::Duration;

use mm_integration::{kvm_available, run_with_timeout, workspace_binary};

const LOAD_ADDR: u64 = 0x100_0000;
const HEADERS: u64 = 64 + 56;

fn int3_kernel() -> Vec<u8> {
    let entry = LOAD_ADDR + HEADERS;
    let mut elf = Vec::new();
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&entry.to_le_bytes());
    elf.extend_from_slice(&64u64.to_le_bytes()); // program headers right after this header
    elf.extend_from_slice(&0u64.to_le_bytes()); // no sections
    elf.extend_from_slice(&0u32.to_le_bytes());
    for half in [64u16, 56, 1, 64, 0, 0] {
        elf.extend_from_slice(&half.to_le_bytes()); // ehsize, phentsize, phnum, shentsize, shnum, shstrndx
    }
    let size = HEADERS + 1;
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    elf.extend_from_slice(&0u64.to_le_bytes()); // file offset
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // vaddr
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // paddr
    elf.extend_from_slice(&size.to_le_bytes());
    elf.extend_from_slice(&size.to_le_bytes());
    elf.extend_from_slice(&0x1000u64.to_le_bytes());
    elf.push(0xcc); // int3
    elf
}

#[test]
fn an_instruction_the_hypervisor_cannot_run_is_a_clear_error_with_the_rip() {
    if !kvm_available("an_instruction_the_hypervisor_cannot_run_is_a_clear_error_with_the_rip") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("mm-int3-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join("int3.elf");
    std::fs::write(&kernel, int3_kernel()).unwrap();

    let mut cmd = Command::new(workspace_binary("mm-vmm").unwrap());
    cmd.arg("--kernel").arg(&kernel).args(["--memory-mib", "64", "--serial", "none"]);
    let run = run_with_timeout(cmd, Duration::from_secs(120)).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();

    assert_eq!(run.status, Some(125), "stderr:\n{}", run.stderr);
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        let rip = format!("rip={:#x}", LOAD_ADDR + HEADERS);
        assert!(run.stderr.contains(&rip), "expected {rip} in:\n{}", run.stderr);
        assert!(run.stderr.contains("could not run guest code"), "stderr:\n{}", run.stderr);
    } else {
        assert!(run.stderr.contains("reset without reporting an exit status"), "stderr:\n{}", run.stderr);
    }
}
