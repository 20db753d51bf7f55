//! Virtio devices as mm-vmm sees them: a virtio-mmio transport (registers
//! the guest driver talks to) whose back end is a vhost-user front end to a
//! device process. No guest-controlled device data is parsed in mm-vmm:
//! rings and buffers are read and written only by the device processes.

pub mod mmio;
pub mod vhost_user;

/// Virtio device ids (virtio 1.2, 5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_VSOCK: u32 = 19;

/// Feature bits of the transport itself.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device status bits (virtio 1.2, 2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_FAILED: u32 = 128;

/// The largest queue we offer; back ends may offer fewer.
pub const MAX_QUEUE_SIZE: u16 = 256;

/// What kind of virtio device a vhost-user back end implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Block,
    Net,
    Vsock,
}

impl DeviceKind {
    pub fn device_type(self) -> u32 {
        match self {
            DeviceKind::Block => TYPE_BLOCK,
            DeviceKind::Net => TYPE_NET,
            DeviceKind::Vsock => TYPE_VSOCK,
        }
    }

    /// Queues the Linux driver uses: block one request queue, net one
    /// rx/tx pair, vsock rx, tx and event.
    pub fn num_queues(self) -> usize {
        match self {
            DeviceKind::Block => 1,
            DeviceKind::Net => 2,
            DeviceKind::Vsock => 3,
        }
    }

    /// Size of the device's config space (struct virtio_blk_config, the
    /// virtio_net_config fields up to mtu, struct virtio_vsock_config).
    pub fn config_size(self) -> usize {
        match self {
            DeviceKind::Block => 60,
            DeviceKind::Net => 12,
            DeviceKind::Vsock => 8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Block => "block",
            DeviceKind::Net => "net",
            DeviceKind::Vsock => "vsock",
        }
    }
}

impl std::str::FromStr for DeviceKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "block" | "blk" => Ok(DeviceKind::Block),
            "net" => Ok(DeviceKind::Net),
            "vsock" => Ok(DeviceKind::Vsock),
            other => Err(format!("unknown device kind {other:?} (block, net or vsock)")),
        }
    }
}
