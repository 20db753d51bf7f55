@0xe9388c7f2f74c955;
# The session a broker holds with the controller (DESIGN.md, "The cluster").
#
# The broker dials the controller, never the other way round, so a broker
# behind NAT joins like any other. The connection is mutual TLS: the
# broker's client certificate, signed by the cluster's CA, is its identity,
# and the certificate's common name (or first DNS name) is the host's name.
# Over it runs Cap'n Proto two-party RPC with the controller's `Cluster` as
# bootstrap capability.
#
# Capabilities, not ids: in `register` the broker hands the controller its
# own `Broker` capability (the same interface mmctl uses on the unix socket,
# audited as caller "controller <host>"), so the controller creates, starts,
# stops, removes, execs into and reads the logs of microVMs with the calls
# mmctl makes, and needs no second protocol. The broker gets a `Session`
# back: holding it is being registered, and dropping the connection ends it.
#
# Machines and microVMs: the controller creates each microVM with the
# machine's id as its name, so after any restart on either side the two
# sides match by name, and a microVM named like no machine of this host is
# one the controller may clean up (other names are the local admin's).

using B = import "broker.capnp";

interface Cluster {
  register @0 (host :HostInfo, broker :B.Broker) -> (session :Session, config :SessionConfig);
  # Registers (or re-registers) this host with its capacity and labels.
  # Fails if `host.name` is not the name in the client certificate.
}

struct HostInfo {
  name @0 :Text;        # empty: the name in the client certificate
  cpus @1 :UInt32;      # vCPUs offered to microVMs
  memoryMib @2 :UInt64; # memory offered to microVMs
  labels @3 :List(Label);
  version @4 :Text;     # the broker's version
}

struct Label {
  key @0 :Text;
  value @1 :Text;
}

struct SessionConfig {
  hostName @0 :Text;      # the name this host is registered under
  heartbeatMs @1 :UInt32; # call `Session.heartbeat` this often
}

interface Session {
  heartbeat @0 (observed :List(MachineObservation));
  # Alive, and this is every microVM on the host: the whole picture, so a
  # machine placed here that is missing from it has no microVM.

  report @1 (observed :List(MachineObservation));
  # These microVMs changed (sent as it happens, between heartbeats).
}

struct MachineObservation {
  name @0 :Text;      # the microVM's name (a machine id for the controller's)
  state @1 :Text;     # created | starting | running | stopping | stopped |
                      # failed | lost, as in VmInfo.state; or removed
  reason @2 :Text;    # why it is failed / lost / stopped, when known
  exitCode @3 :Int32; # the workload's exit status once stopped; -1 if none
}
