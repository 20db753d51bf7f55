@0xc92753cadfc7a318;
# What happens to microVMs on a broker, as it happens: every line of every
# microVM's audit log (spawns, exits with code or signal, restarts, control
# calls with their caller, state changes), pushed to subscribers. `mmctl
# events` prints them; a controller learns observed state from them.

struct Event {
  time @0 :Text;      # RFC 3339, as in the audit log
  vmId @1 :Text;      # empty for broker-wide events
  vmName @2 :Text;
  kind @3 :Text;      # create | start | spawn | exit | restart | state | stop | remove | lost | give-up | exec | connect | lagged ...
  detail @4 :Text;    # the whole audit line, a JSON object
}

interface EventSink {
  push @0 (event :Event);
  # Each push returns before the next is sent: a slow subscriber slows
  # only itself. One that falls more than 1024 events behind gets a
  # `lagged` event saying how many it missed.
}

interface Subscription {}
# Holding it keeps the stream going; dropping it ends the stream.
