//! Everything the guest finds in memory at its first instruction: the
//! kernel (ELF vmlinux or bzImage), the initramfs, the command line, the
//! zero page with its e820 map, the MP table, the boot GDT and page tables.

use std::fs::File;
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::{BzImage, Cmdline, KernelLoader, load_cmdline};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::gdt::BOOT_GDT;
use crate::layout::*;
use crate::loader::{self, LoadError};

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x100_0000;
/// A bzImage's 64-bit entry point is this far past where it is loaded.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel { path: String, source: std::io::Error },
    #[error("{path} is neither an ELF vmlinux nor a bzImage ({reason})")]
    BadKernel { path: String, reason: String },
    #[error("cannot load kernel {path}: {source}")]
    LoadKernel { path: String, source: LoadError },
    #[error("cannot load initramfs {path}: {source}")]
    LoadInitrd { path: String, source: LoadError },
    #[error("cannot read initramfs {path}: {source}")]
    OpenInitrd { path: String, source: std::io::Error },
    #[error("initramfs {path} ({size} bytes) does not fit in guest memory above the kernel")]
    InitrdTooLarge { path: String, size: u64 },
    #[error("kernel command line is too long or invalid: {0}")]
    Cmdline(String),
    #[error("cannot write boot data into guest memory: {0}")]
    Memory(String),
}

/// What the vCPU set-up needs to know about the loaded kernel.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub entry: GuestAddress,
}

fn mem_err(e: impl std::fmt::Display) -> BootError {
    BootError::Memory(e.to_string())
}

/// Where the kernel landed and what the guest's zero page needs of it.
struct KernelPlacement {
    entry: GuestAddress,
    /// First guest address past the kernel: the initramfs goes above.
    end: u64,
    /// A bzImage's own setup header; an ELF vmlinux has none.
    setup_header: Option<setup_header>,
}

/// Loads `path` into guest memory, ELF first (our loader, see
/// [`crate::loader`]), bzImage second (linux-loader's).
fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<KernelPlacement, BootError> {
    let shown = path.display().to_string();
    let mut file = File::open(path).map_err(|source| BootError::OpenKernel { path: shown.clone(), source })?;
    match loader::load_elf(mem, &file, HIMEM_START) {
        Ok(Some(elf)) => return Ok(KernelPlacement { entry: elf.entry, end: elf.end, setup_header: None }),
        Ok(None) => {}
        Err(e @ LoadError::BadElf(_)) => return Err(BootError::BadKernel { path: shown, reason: e.to_string() }),
        Err(e) => return Err(BootError::LoadKernel { path: shown, source: e }),
    }
    match BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))) {
        Ok(result) => Ok(KernelPlacement {
            entry: result.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
            end: result.kernel_end,
            setup_header: result.setup_header,
        }),
        Err(bz_err) => Err(BootError::BadKernel { path: shown, reason: format!("not ELF; bzImage: {bz_err}") }),
    }
}

/// End of RAM below the MMIO gap.
fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.last_addr().raw_value().min(MMIO_GAP_START - 1) + 1
}

/// Loads the initramfs page-aligned at the top of low RAM, above the kernel.
fn load_initrd(mem: &GuestMemoryMmap, path: &Path, kernel_end: u64) -> Result<(u64, u64), BootError> {
    let shown = path.display().to_string();
    let open_err = |source| BootError::OpenInitrd { path: shown.clone(), source };
    let file = File::open(path).map_err(open_err)?;
    let size = file.metadata().map_err(open_err)?.len();
    let top = low_ram_end(mem);
    let start = top.checked_sub(size).map(|a| a & !0xfff).filter(|a| *a >= kernel_end);
    let Some(start) = start else {
        return Err(BootError::InitrdTooLarge { path: shown, size });
    };
    loader::copy_to_guest(mem, GuestAddress(start), &file, 0, size)
        .map_err(|source| BootError::LoadInitrd { path: shown, source })?;
    Ok((start, size))
}

/// Identity-maps the first GiB with 2 MiB pages and writes the boot GDT.
fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START)).map_err(mem_err)?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START)).map_err(mem_err)?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8)).map_err(mem_err)?;
    }
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + i as u64 * 8)).map_err(mem_err)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START)).map_err(mem_err)?;
    Ok(())
}

fn add_e820(params: &mut boot_params, addr: u64, size: u64) -> Result<(), BootError> {
    let i = usize::from(params.e820_entries);
    let slot = params.e820_table.get_mut(i).ok_or_else(|| mem_err("e820 table full"))?;
    slot.addr = addr;
    slot.size = size;
    slot.r#type = E820_RAM;
    params.e820_entries += 1;
    Ok(())
}

/// Builds the command line the guest sees.
pub fn build_cmdline(parts: &[&str]) -> Result<Cmdline, BootError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    for part in parts.iter().filter(|p| !p.trim().is_empty()) {
        cmdline.insert_str(part.trim()).map_err(|e| BootError::Cmdline(e.to_string()))?;
    }
    Ok(cmdline)
}

/// Puts kernel, initramfs, command line and boot tables into guest memory.
pub fn load(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &Cmdline,
    cpus: u8,
) -> Result<LoadedKernel, BootError> {
    let t = std::time::Instant::now();
    let kernel = load_kernel(mem, kernel)?;
    tracing::debug!(us = t.elapsed().as_micros() as u64, "kernel copied");
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(|e| BootError::Cmdline(e.to_string()))?;
    write_boot_tables(mem)?;
    crate::mptable::write(mem, cpus).map_err(mem_err)?;

    let hdr = kernel.setup_header.unwrap_or(setup_header {
        boot_flag: KERNEL_BOOT_FLAG_MAGIC,
        header: KERNEL_HDR_MAGIC,
        kernel_alignment: KERNEL_MIN_ALIGNMENT,
        ..Default::default()
    });
    let mut params = boot_params { hdr, ..Default::default() };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline.as_cstring().map(|c| c.as_bytes().len() as u32).unwrap_or(0) + 1;
    if let Some(path) = initrd {
        let t = std::time::Instant::now();
        let (start, size) = load_initrd(mem, path, kernel.end)?;
        tracing::debug!(us = t.elapsed().as_micros() as u64, "initramfs copied");
        params.hdr.ramdisk_image = start as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    add_e820(&mut params, 0, EBDA_START)?;
    add_e820(&mut params, HIMEM_START, low_ram_end(mem) - HIMEM_START)?;
    if mem.last_addr().raw_value() >= MMIO_GAP_END {
        add_e820(&mut params, MMIO_GAP_END, mem.last_addr().raw_value() + 1 - MMIO_GAP_END)?;
    }
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(mem_err)?;
    Ok(LoadedKernel { entry: kernel.entry })
}
