@0x83f33eb639db9992;
# mm-broker ↔ one mm-device process: its control channel. The same
# transport as vmm.capnp (one message per SOCK_SEQPACKET packet, request
# then response); the device listens on a socket the broker bound in the
# microVM's directory and passed in (`--control-fd N`), and serves one
# connection at a time, so a restarted broker reaches re-adopted devices.

struct DeviceRequest {
  command @0 :Command;
  enum Command {
    status @0;
    setRateLimit @1;   # replace the limits with `rateLimit`; answered
                       # with the status (the limits now in force)
  }
  rateLimit @1 :RateLimit;
}

# A device's rate limiter (block: each request; net: each frame, both
# directions). 0 = unlimited. Token buckets holding 100 ms of each rate,
# plus an optional one-time burst of bytes used before the bucket.
struct RateLimit {
  bytesPerSec @0 :UInt64;
  opsPerSec @1 :UInt64;
  burstBytes @2 :UInt64;
}

struct DeviceResponse {
  union {
    error @0 :Text;
    status @1 :DeviceStatus;
  }
}

struct DeviceStatus {
  kind @0 :Text;          # block | net | vsock
  usage @1 :ProcessUsage;
  resubmitted @2 :UInt64; # block: requests a killed predecessor left in
                          # flight that this process ran again (0 for others)
  inFlight @3 :UInt64;    # block: requests taken and not yet completed, now
  rateLimit @4 :RateLimit;     # the limits in force (all 0: none)
  throttledTotal @5 :UInt64;   # requests/frames that had to wait for tokens
}

struct ProcessUsage {
  # getrusage(RUSAGE_SELF) of the answering process, and how long it has run.
  uptimeMs @0 :UInt64;
  userCpuMs @1 :UInt64;
  systemCpuMs @2 :UInt64;
  maxRssKib @3 :UInt64;
}
