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
  }
}

struct VmmResponse {
  union {
    ok @0 :Void;
    error @1 :Text;
    status @2 :VmmStatus;
  }
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
