//! `mm-device block|net|vsock`: serve one virtio device as a vhost-user
//! back end on a socket handed in by the broker (or a path, for manual use).

fn main() -> anyhow::Result<()> {
    anyhow::bail!("mm-device: not implemented yet")
}
