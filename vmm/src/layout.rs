//! Where things live in guest-physical memory. One place, so the boot code,
//! the MP table, the e820 map and the devices cannot disagree.

/// The boot GDT (four 8-byte entries) and an empty IDT right after it.
pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
/// Linux boot protocol "zero page" (struct boot_params); RSI points here.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack of the boot vCPU, below the page tables.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapped boot page tables: PML4, one PDPT and one PD of 2 MiB
/// pages cover the first GiB, which holds everything the kernel needs
/// before it builds its own tables.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line; the x86 boot protocol caps it at 2048 bytes here.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Extended BIOS data area: the MP table goes here, where Linux scans for it.
pub const EBDA_START: u64 = 0x9fc00;
/// First byte above the legacy hole; the kernel loads here.
pub const HIMEM_START: u64 = 0x10_0000;

/// Guest RAM below 4 GiB ends here; the rest of RAM continues at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// mm-vmm's boot device (user-space marker and exit status), one page.
pub const BOOT_DEVICE_START: u64 = MMIO_GAP_START;
pub const BOOT_DEVICE_SIZE: u64 = 0x1000;
/// Where the in-kernel IOAPIC and local APICs sit (architectural defaults).
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;

/// Legacy I/O ports we emulate.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;

/// KVM needs three pages for the TSS of real-mode emulation on Intel; put
/// them at the top of the 32-bit space, out of the way of RAM and devices.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
