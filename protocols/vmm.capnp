@0xb512ecba92436af4;
# mm-broker ↔ mm-vmm: the control channel of one microVM's vCPU process.
#
# Not capnp-rpc: each request and each response is one Cap'n Proto message
# (the standard serialization) in one SOCK_SEQPACKET packet, request then
# response, so mm-vmm's control thread stays a blocking loop with no async
# runtime in the vCPU process (and a small seccomp policy). A file
# descriptor travels attached to its request's packet (SCM_RIGHTS), never
# inside the message (DESIGN.md, "Wire protocols").
#
# mm-vmm listens (`--control PATH` or an inherited listening socket,
# `--control fd:N`) and serves one connection at a time, so a broker that
# restarts connects again and keeps control of the microVMs it re-adopts.

struct VmmRequest {
  union {
    reconnectDevice @0 :UInt32;
    # Device INDEX (guest order) gets a new back end: the connected
    # vhost-user socket to it is attached. mm-vmm replays the set-up and
    # resubmits in-flight requests.
    status @1 :Void;
    pause @2 :Void;
    # Stop every vCPU (kicked out of KVM_RUN, parked) and quiesce every
    # activated device (vhost-user GET_VRING_BASE on each ring: the back end
    # finishes what it holds and stops). Guest memory and every device's
    # state then stay still until `resume`. Idempotent.
    resume @3 :Void;
    # Restart the rings where they stopped and let the vCPUs run again.
    snapshot @4 :Void;
    # Only while paused. Two files are attached, in order: the state file
    # (written with the VM's whole state, JSON, see vmm/src/snapshot) and
    # the memory file (guest RAM at its own offsets, sparse: never-touched
    # and zero pages are holes). Both are opened by the broker; the jailed
    # mm-vmm gets only the fds. Answered with `snapshotted`.
    snapshotRunning @5 :Void;
    # A snapshot of a RUNNING VM whose vCPUs stop only for the consistent
    # cut, not for the whole copy. Same two files attached as `snapshot`.
    # mm-vmm has the device back ends log their writes to guest RAM
    # (vhost-user LOG_SHMFD; a back end that cannot has every device
    # quiesced from the start instead), turns on KVM dirty logging, copies
    # guest RAM while the vCPUs and devices run, then quiesces the devices,
    # pauses the vCPUs, copies the pages either log names, saves the vCPU,
    # machine and device state, and lets the vCPUs run again. On
    # `snapshotted` the guest runs, but its devices stay quiesced (its I/O
    # waits), so that the broker can copy the disks at the same cut;
    # `resume` then restarts them. `pausedUs` is the vCPU pause. The two
    # files are written but not synced: the broker syncs them after
    # `resume`, so the guest's I/O does not wait for the fsync.
  }
}

struct VmmResponse {
  union {
    ok @0 :Void;
    error @1 :Text;
    status @2 :VmmStatus;
    snapshotted @3 :SnapshotReport;
  }
}

struct SnapshotReport {
  memoryBytes @0 :UInt64;     # guest RAM bytes written (non-zero pages)
  stateBytes @1 :UInt64;      # size of the state file
  saveUs @2 :UInt64;          # time to save state and memory (the VM is paused)
  pausedUs @3 :UInt64;        # since `pause` took effect, so far; for
                              # snapshotRunning, the vCPUs' pause (the cut)
  dirtyPages @4 :UInt64;      # snapshotRunning: pages copied again in the cut
  devicePages @5 :UInt64;     # snapshotRunning: of those, pages the device
                              # back ends wrote (their vhost-user dirty log)
  ioRunUs @6 :UInt64;         # snapshotRunning: how long the devices kept
                              # serving the guest after the request (the copy
                              # beside a logging back end); 0: held from the start
}

struct VmmStatus {
  vcpus @0 :UInt32;
  memoryMib @1 :UInt32;
  uptimeMs @2 :UInt64;
  devices @3 :List(DeviceStatus);
  usage @4 :Device.ProcessUsage;  # mm-vmm's own (its jailed half's)
}

using Device = import "device.capnp";

struct DeviceStatus {
  index @0 :UInt32;
  kind @1 :Text;          # block | net | vsock
  reconnects @2 :UInt32;  # back ends replaced so far
}
