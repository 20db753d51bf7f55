//! The VM-wide KVM state: the in-kernel interrupt controllers (both PICs
//! and the IOAPIC), the PIT, and the KVM clock.

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, kvm_clock_data, kvm_irqchip, kvm_pit_state2,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

fn chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, (&'static str, kvm_ioctls::Error)> {
    let mut chip = kvm_irqchip { chip_id, ..Default::default() };
    vm.get_irqchip(&mut chip).map_err(|e| ("KVM_GET_IRQCHIP", e))?;
    Ok(chip)
}

impl MachineState {
    /// Reads the VM's state; the vCPUs must be paused.
    pub fn save(vm: &VmFd) -> Result<MachineState, (&'static str, kvm_ioctls::Error)> {
        let mut clock = vm.get_clock().map_err(|e| ("KVM_GET_CLOCK", e))?;
        // The clock is set back as a plain value: the guest sees no time
        // pass while it was saved (its wall clock is corrected by mm-init
        // afterwards), and KVM_SET_CLOCK takes none of the flags GET gives.
        clock.flags = 0;
        Ok(MachineState {
            pic_master: chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(|e| ("KVM_GET_PIT2", e))?,
            clock,
        })
    }

    /// Sets it on a VM whose irqchip and PIT exist and whose vCPUs do not
    /// run yet.
    pub fn restore(&self, vm: &VmFd) -> Result<(), (&'static str, kvm_ioctls::Error)> {
        vm.set_pit2(&self.pit).map_err(|e| ("KVM_SET_PIT2", e))?;
        vm.set_clock(&self.clock).map_err(|e| ("KVM_SET_CLOCK", e))?;
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            vm.set_irqchip(chip).map_err(|e| ("KVM_SET_IRQCHIP", e))?;
        }
        Ok(())
    }
}
