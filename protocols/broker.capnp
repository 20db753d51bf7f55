@0xd2692d399556eec1;
# mm-broker's interface to its clients (mmctl today; the controller later).
#
# Capabilities, not ids: `Broker.createVm` and `Broker.getVm` return a `Vm`
# capability, and holding it is what lets a client act on that microVM.
# The socket that serves `Broker` is owner-only (root), so the bootstrap
# capability itself is the admin's.

interface Broker {
  createVm @0 (spec :VmSpec) -> (vm :Vm);
  # Creates a microVM from `spec` and boots it. Fails with a clear message
  # for a duplicate name, an unknown image or not enough host memory.

  getVm @1 (name :Text) -> (vm :Vm);
  # The microVM called `name` (or whose id starts with it).

  listVms @2 () -> (vms :List(VmInfo));

  version @3 () -> (version :Text);

  events @4 (sink :Events.EventSink) -> (subscription :Events.Subscription);
  # From now on, every event of every microVM is pushed to `sink`, until
  # the client drops `subscription` (or stops answering).

  listSnapshots @5 (vm :Text) -> (snapshots :List(SnapshotInfo));
  # This host's snapshots, oldest first; with `vm` (a name or id), only
  # those taken of that microVM.

  removeSnapshot @6 (id :Text);
  # Deletes a snapshot (an id, a unique id prefix, or its name).

  restoreVm @7 (snapshot :Text, name :Text, sshKeys :List(Text)) -> (vm :Vm);
  # A NEW microVM running from `snapshot` without a boot: its own id,
  # name (empty: the broker picks one), vsock CID, MAC and address, a copy
  # of the snapshot's disk, a reseeded RNG, the wall clock set, a new SSH
  # host key; `sshKeys` replace the snapshot's authorized keys if given.

  forkVm @8 (snapshot :Text, count :UInt32, namePrefix :Text, sshKeys :List(Text)) -> (vms :List(Vm));
  # `count` (1 to 64) NEW microVMs from `snapshot`, each as `restoreVm`
  # makes one, named PREFIX-1..PREFIX-count (prefix empty: the snapshot's
  # name, else its id's first 6 characters, then "-fork"). Refused before
  # any starts when a name is taken or the host has no room for all.
}

struct SnapshotInfo {
  id @0 :Text;
  name @1 :Text;
  kind @2 :Text;          # snapshot | suspend
  vmId @3 :Text;
  vmName @4 :Text;
  createdAt @5 :Text;     # RFC 3339
  cpus @6 :UInt8;
  memoryMib @7 :UInt32;
  memoryBytes @8 :UInt64; # guest RAM saved (zero and untouched pages left out)
  diskBytes @9 :UInt64;   # space the snapshot takes on disk
  pauseUs @10 :UInt64;    # how long the guest stood still for it
}

using Events = import "events.capnp";

struct VmSpec {
  name @0 :Text;          # empty: the broker picks one
  image @1 :Text;         # empty or "builtin": the built-in busybox image
  cpus @2 :UInt8;         # 1 to the host's maximum; 0 is refused
  memoryMib @3 :UInt32;
  command @4 :List(Text); # empty: the image's default (`sh`)
  env @5 :List(EnvVar);
  autoRemove @6 :Bool;    # remove once stopped (`mmctl run --rm`)
  sshKeys @7 :List(Text); # authorized_keys lines for the guest's SSH server
  cold @8 :Bool;          # boot, even when a warm (post-boot) snapshot of the image exists
  cpuQuotaMillis @9 :UInt32; # mm-vmm's CPU time cap, in thousandths of a core (500: half
                             # a core); 0: one core per vCPU
  cpuWeight @10 :UInt16;  # mm-vmm's share under contention, 1 to 10000; 0: 100
  limits @11 :IoLimits;   # disk and network rate limits (absent or 0: none)
}

# Rate limits of a microVM's device back ends (token buckets holding
# 100 ms of each rate); 0 = unlimited. Disk limits apply to each disk.
# More than 100 GiB/s or 10M ops/s is refused.
struct IoLimits {
  diskBps @0 :UInt64;    # bytes/s read + written
  diskIops @1 :UInt64;   # requests/s
  netBps @2 :UInt64;     # bytes/s, each direction
  netPps @3 :UInt64;     # frames/s, each direction
}

struct EnvVar {
  name @0 :Text;
  value @1 :Text;
}

struct VmInfo {
  id @0 :Text;
  name @1 :Text;
  image @2 :Text;
  state @3 :Text;        # created | starting | running | stopping | stopped | failed | lost | suspended
  reason @4 :Text;       # why it is failed / lost / stopped, when known
  cpus @5 :UInt8;
  memoryMib @6 :UInt32;
  exitCode @7 :Int32;    # the workload's exit status once stopped; -1 if none
  createdAt @8 :Text;    # RFC 3339
  pids @9 :List(Process);
  ip @10 :Text;          # the guest's address on the microVM network; empty if none
  command @11 :List(Text);
  mac @12 :Text;
  cpuQuotaMillis @13 :UInt32;       # mm-vmm's CPU time cap (thousandths of a core)
  cpuWeight @14 :UInt16;            # mm-vmm's CPU weight (1 to 10000)
  vmmMemoryMaxBytes @15 :UInt64;    # mm-vmm's host memory limit (guest RAM + overhead)
  deviceMemoryMaxBytes @16 :UInt64; # each device process's host memory limit
  consoleLogMaxBytes @17 :UInt64;   # console.log is rotated (one console.log.1) at this size
  limits @18 :IoLimits;             # the device back ends' rate limits
}

struct Process {
  role @0 :Text;         # vmm | block-root | vsock | net ...
  pid @1 :Int32;
  restarts @2 :UInt32;
}

interface Vm {
  info @0 () -> (info :VmInfo);

  start @1 ();
  # Boots a stopped microVM again (same disk).

  stop @2 (timeoutMs :UInt32) -> (info :VmInfo);
  # Asks the guest to shut down; after `timeoutMs`, ends it by force.

  remove @3 (force :Bool);
  # Deletes the microVM and its disk; refused while running unless `force`.

  logs @4 (follow :Bool, sink :ByteSink);
  # Streams the console log into `sink` from the start; with `follow`,
  # keeps streaming until the microVM stops, then calls `sink.done`.

  exec @5 (request :ExecRequest, output :ExecOutput) -> (session :ExecSession);
  # Runs a command in the guest through the exec agent. Output arrives on
  # `output`; `session` carries stdin, resizes and signals.

  audit @6 () -> (lines :List(Text));
  # The microVM's audit log, one JSON object per line.

  wait @7 () -> (info :VmInfo);
  # Returns once the microVM is no longer running.

  connect @8 (port :UInt16, toClient :ByteSink) -> (toGuest :ByteSink);
  # A TCP connection to `port` on the guest's address, made by the broker
  # from inside the microVM network (which the host may have no route
  # into): `mmctl ssh` and `mmctl port-forward` ride on it. Bytes from the
  # guest arrive on `toClient` (then `done` at the guest's end of stream);
  # the client writes to `toGuest`, and `done` half-closes the connection.
  # Each `write` returns once the bytes are handed to the socket, so a
  # client that awaits its writes gets flow control.

  stats @9 () -> (processes :List(ProcessStats));
  # Each process of the running microVM, asked over its own control
  # channel (protocols/vmm.capnp, protocols/device.capnp).

  snapshot @10 (name :Text) -> (snapshot :SnapshotInfo);
  # Saves the running microVM (every process: vCPUs, devices, memory, its
  # disk at the same instant) and lets it run on.

  suspend @11 () -> (info :VmInfo);
  # Saves the running microVM to disk and ends its processes (state
  # `suspended`, no host memory held); `start` resumes it where it was.

  branch @12 (name :Text) -> (vm :Vm);
  # A NEW microVM that is a live copy of this running one: a snapshot
  # taken while it runs on (vCPUs paused only for the cut), restored at
  # once with its own identity (as `restoreVm`; name empty: `NAME-branch`,
  # then `-2`, ...), its disk a copy-on-write layer; the snapshot is
  # removed once the copy has taken its identity.

  update @13 (limits :IoLimits) -> (info :VmInfo);
  # Replaces the microVM's rate limits (all four; 0 = unlimited): recorded
  # (restarted devices keep them), and applied at once to a running
  # microVM's devices over their control channels, between two requests
  # (nothing is dropped or failed).
}

struct ProcessStats {
  role @0 :Text;
  pid @1 :Int32;
  restarts @2 :UInt32;
  error @3 :Text;        # non-empty: the process did not answer, and why
  uptimeMs @4 :UInt64;   # since this process started serving
  userCpuMs @5 :UInt64;
  systemCpuMs @6 :UInt64;
  maxRssKib @7 :UInt64;
  reconnects @8 :UInt32; # devices: back ends mm-vmm was handed for it
  resubmitted @9 :UInt64; # block: requests its predecessor left in flight
                          # that this process ran again
  throttledTotal @10 :UInt64; # block, net: requests/frames its rate limiter
                              # made wait
}

interface ByteSink {
  write @0 (data :Data);
  done @1 ();
}

struct ExecRequest {
  argv @0 :List(Text);
  env @1 :List(EnvVar);
  cwd @2 :Text;          # empty: /
  user @3 :Text;         # empty: root
  tty @4 :Bool;
  rows @5 :UInt16;
  cols @6 :UInt16;
}

interface ExecOutput {
  stdout @0 (data :Data);
  stderr @1 (data :Data);
  exit @2 (code :Int32, signal :Int32, error :Text);
  # The command ended: with `code` (signal 0), or killed by `signal`, or
  # could not run at all (`error` non-empty).
}

interface ExecSession {
  stdin @0 (data :Data);
  closeStdin @1 ();
  resize @2 (rows :UInt16, cols :UInt16);
  signal @3 (signal :Int32);
}
