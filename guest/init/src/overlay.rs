//! The writable root: every microVM of an image shares one read-only base
//! disk (the kernel's `root=`, mounted read-only), and gets its own small
//! disk for changes (`mm.overlay=/dev/vdb`, an empty ext4 the broker
//! makes). PID 1 lays an overlay of the two over `/` and moves into it
//! before anything else runs, so the workload sees an ordinary writable
//! root and the base is never written.

use std::path::Path;

use nix::mount::{MntFlags, MsFlags, mount, umount2};

#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("{step}: {source}")]
    Step { step: &'static str, source: nix::Error },
    #[error("{step}: {source}")]
    Io { step: &'static str, source: std::io::Error },
}

fn step(step: &'static str) -> impl FnOnce(nix::Error) -> OverlayError {
    move |source| OverlayError::Step { step, source }
}

fn io(step: &'static str) -> impl FnOnce(std::io::Error) -> OverlayError {
    move |source| OverlayError::Io { step, source }
}

/// Mounts `device` (ext4) as the upper layer over the current root and
/// pivots into the overlay. The old root stays the lower layer; its other
/// mounts (/proc, /dev, ...) are dropped, so the caller mounts them again.
pub fn switch_root(device: &str) -> Result<(), OverlayError> {
    // The base is read-only: the mount points live in a tmpfs on /mnt.
    let none = None::<&str>;
    mount(Some("tmpfs"), "/mnt", Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, none)
        .map_err(step("mounting a tmpfs on /mnt"))?;
    std::fs::create_dir_all("/mnt/rw").map_err(io("creating /mnt/rw"))?;
    std::fs::create_dir_all("/mnt/root").map_err(io("creating /mnt/root"))?;
    mount(Some(device), "/mnt/rw", Some("ext4"), MsFlags::MS_NOATIME, none)
        .map_err(step("mounting the writable disk"))?;
    for dir in ["/mnt/rw/upper", "/mnt/rw/work"] {
        std::fs::create_dir_all(dir).map_err(io("creating the overlay's directories"))?;
    }
    let options = "lowerdir=/,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work";
    mount(Some("overlay"), "/mnt/root", Some("overlay"), MsFlags::empty(), Some(options))
        .map_err(step("mounting the overlay"))?;
    std::env::set_current_dir("/mnt/root").map_err(io("entering the overlay"))?;
    // The old root goes to the overlay's /mnt (the base's empty /mnt).
    nix::unistd::pivot_root(".", "mnt").map_err(step("pivot_root into the overlay"))?;
    nix::unistd::chroot(".").map_err(step("chroot into the overlay"))?;
    std::env::set_current_dir("/").map_err(io("entering /"))?;
    // Detach the old tree; the overlay keeps its layers alive.
    umount2("/mnt", MntFlags::MNT_DETACH).map_err(step("detaching the old root"))?;
    debug_assert!(Path::new("/proc").exists());
    Ok(())
}
