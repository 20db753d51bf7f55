//! Machine states and the transitions between them, as pure logic.
//!
//! The names are Fly's Machines API's, so clients written against that API
//! read ours without a glossary. Keeping the rules here (and not in SQL or in
//! handlers) lets one table of unit tests pin every transition, and lets the
//! broker session (later) reuse exactly the same rules for observed state.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The lifecycle state of a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MachineState {
    /// Placed on a host; no broker has started it yet.
    Created,
    /// Asked to start; waiting for the broker to report it running.
    Starting,
    /// Running on its host.
    Started,
    /// Asked to stop; waiting for the broker to report it stopped.
    Stopping,
    /// Not running; its disk stays on its host.
    Stopped,
    /// The broker gave up on it (it may be started again).
    Failed,
    /// Asked to suspend; waiting for its broker to save it to disk and end
    /// its processes.
    Suspending,
    /// Saved to disk on its host with no process left (no host memory
    /// held); a start resumes it where it was, without a boot.
    Suspended,
    /// Asked to go away; waiting for the broker to clean up.
    Destroying,
    /// Gone; the row stays for history and idempotent retries.
    Destroyed,
}

impl MachineState {
    /// Every state, in lifecycle order.
    pub const ALL: [MachineState; 10] = [
        Self::Created,
        Self::Starting,
        Self::Started,
        Self::Stopping,
        Self::Stopped,
        Self::Failed,
        Self::Suspending,
        Self::Suspended,
        Self::Destroying,
        Self::Destroyed,
    ];

    /// The name stored in Postgres and shown in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Starting => "starting",
            Self::Started => "started",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
            Self::Suspending => "suspending",
            Self::Suspended => "suspended",
            Self::Destroying => "destroying",
            Self::Destroyed => "destroyed",
        }
    }

    /// Whether a process may be running on the host in this state, so that
    /// the controller must not move the machine elsewhere on its own. (A
    /// suspended machine runs nothing, but its saved state is on its host:
    /// moving it loses that, see `store::relocation`.)
    pub fn may_be_running(self) -> bool {
        matches!(self, Self::Starting | Self::Started | Self::Stopping | Self::Suspending | Self::Destroying)
    }
}

impl fmt::Display for MachineState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no machine state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown machine state {0:?} (expected one of created, starting, started, stopping, stopped, failed, suspending, suspended, destroying, destroyed)"
)]
pub struct UnknownState(pub String);

impl FromStr for MachineState {
    type Err = UnknownState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|state| state.as_str() == s).ok_or_else(|| UnknownState(s.to_owned()))
    }
}

/// What someone asks of a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A user's start.
    Start,
    /// A user's stop.
    Stop,
    /// A user's suspend: save the running guest to disk on its host and
    /// end its processes; a start resumes it.
    Suspend,
    /// A user's delete; `force` also destroys a machine that may be running.
    Destroy { force: bool },
    /// A broker's report of what it observes (for now through the admin
    /// stand-in endpoint).
    Observed(MachineState),
}

/// Why an action is refused in the current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {action} a machine that is {state}: {hint}")]
pub struct TransitionError {
    pub action: &'static str,
    pub state: MachineState,
    pub hint: &'static str,
}

/// The state `action` moves a machine in `state` to; `Ok(None)` when the
/// machine already is where the action would take it (a retried start or
/// stop succeeds without recording a transition).
pub fn next_state(state: MachineState, action: Action) -> Result<Option<MachineState>, TransitionError> {
    use MachineState::*;
    let refuse = |action, hint| Err(TransitionError { action, state, hint });
    match action {
        Action::Start => match state {
            // From suspended, the broker's start resumes the saved guest.
            Created | Stopped | Failed | Suspended => Ok(Some(Starting)),
            Starting | Started => Ok(None),
            Stopping => refuse("start", "wait until it is stopped"),
            Suspending => refuse("start", "wait until it is suspended"),
            Destroying | Destroyed => refuse("start", "it is being destroyed"),
        },
        Action::Stop => match state {
            Starting | Started => Ok(Some(Stopping)),
            // A suspended machine runs nothing already (and its broker's
            // stop leaves the saved state alone).
            Stopping | Stopped | Suspended => Ok(None),
            Created | Failed => refuse("stop", "it is not running"),
            Suspending => refuse("stop", "wait until it is suspended"),
            Destroying | Destroyed => refuse("stop", "it is being destroyed"),
        },
        Action::Suspend => match state {
            Started => Ok(Some(Suspending)),
            Suspending | Suspended => Ok(None),
            // Its guest is not up yet: there is nothing worth saving.
            Starting => refuse("suspend", "wait until it is started"),
            Created | Stopped | Failed => refuse("suspend", "it is not running"),
            Stopping => refuse("suspend", "it is stopping"),
            Destroying | Destroyed => refuse("suspend", "it is being destroyed"),
        },
        Action::Destroy { force } => match state {
            // Nothing exists on any host before a broker starts it.
            Created => Ok(Some(Destroyed)),
            Stopped | Failed | Suspended => Ok(Some(Destroying)),
            Starting | Started | Stopping | Suspending if force => Ok(Some(Destroying)),
            Starting | Started | Stopping => refuse("destroy", "stop it first, or pass force=true"),
            Suspending => refuse("destroy", "wait until it is suspended, or pass force=true"),
            Destroying | Destroyed => Ok(None),
        },
        Action::Observed(observed) => {
            if observed == state {
                return Ok(None);
            }
            match (state, observed) {
                (Destroyed, _) => refuse("report", "it is already destroyed"),
                (_, Created) => refuse("report", "a broker never reports created"),
                // A broker finishing a destroy, or having nothing left.
                (Destroying, Destroyed | Failed) => Ok(Some(observed)),
                (Destroying, _) => refuse("report", "it is being destroyed"),
                (_, Destroying) => refuse("report", "only the controller starts a destroy"),
                _ => Ok(Some(observed)),
            }
        }
    }
}

/// Whether a machine in `state` can be branched (copied live into a new
/// machine, `Vm.branch`): only a started one has a running guest to copy.
pub fn can_branch(state: MachineState) -> Result<(), TransitionError> {
    use MachineState::*;
    let refuse = |hint| Err(TransitionError { action: "branch", state, hint });
    match state {
        Started => Ok(()),
        Starting => refuse("wait until it is started (a branch copies a running guest)"),
        Created | Stopped | Failed => refuse("it is not running (a branch copies a running guest; start it first)"),
        Suspending => refuse("it is being suspended"),
        Suspended => refuse("it is suspended (start it first: a branch copies a running guest)"),
        Stopping => refuse("it is stopping"),
        Destroying | Destroyed => refuse("it is being destroyed"),
    }
}

#[cfg(test)]
mod tests {
    use super::MachineState::*;
    use super::*;

    #[test]
    fn names_round_trip() {
        for state in MachineState::ALL {
            assert_eq!(state.as_str().parse::<MachineState>().unwrap(), state);
            assert_eq!(serde_json::to_value(state).unwrap(), serde_json::json!(state.as_str()));
        }
        assert!("running".parse::<MachineState>().is_err());
    }

    #[test]
    fn user_actions() {
        type Case = (MachineState, Action, Result<Option<MachineState>, ()>);
        let table: &[Case] = &[
            (Created, Action::Start, Ok(Some(Starting))),
            (Stopped, Action::Start, Ok(Some(Starting))),
            (Failed, Action::Start, Ok(Some(Starting))),
            (Started, Action::Start, Ok(None)),
            (Stopping, Action::Start, Err(())),
            (Destroyed, Action::Start, Err(())),
            (Started, Action::Stop, Ok(Some(Stopping))),
            (Starting, Action::Stop, Ok(Some(Stopping))),
            (Stopped, Action::Stop, Ok(None)),
            (Created, Action::Stop, Err(())),
            (Created, Action::Destroy { force: false }, Ok(Some(Destroyed))),
            (Stopped, Action::Destroy { force: false }, Ok(Some(Destroying))),
            (Started, Action::Destroy { force: false }, Err(())),
            (Started, Action::Destroy { force: true }, Ok(Some(Destroying))),
            (Destroyed, Action::Destroy { force: false }, Ok(None)),
            (Started, Action::Suspend, Ok(Some(Suspending))),
            (Suspending, Action::Suspend, Ok(None)),
            (Suspended, Action::Suspend, Ok(None)),
            (Starting, Action::Suspend, Err(())),
            (Stopped, Action::Suspend, Err(())),
            (Created, Action::Suspend, Err(())),
            (Destroying, Action::Suspend, Err(())),
            (Suspended, Action::Start, Ok(Some(Starting))),
            (Suspending, Action::Start, Err(())),
            (Suspended, Action::Stop, Ok(None)),
            (Suspending, Action::Stop, Err(())),
            (Suspended, Action::Destroy { force: false }, Ok(Some(Destroying))),
            (Suspending, Action::Destroy { force: false }, Err(())),
            (Suspending, Action::Destroy { force: true }, Ok(Some(Destroying))),
        ];
        for &(state, action, expected) in table {
            assert_eq!(next_state(state, action).map_err(|_| ()), expected, "{state} {action:?}");
        }
    }

    #[test]
    fn observed_states() {
        assert_eq!(next_state(Starting, Action::Observed(Started)), Ok(Some(Started)));
        assert_eq!(next_state(Started, Action::Observed(Started)), Ok(None));
        assert_eq!(next_state(Destroying, Action::Observed(Destroyed)), Ok(Some(Destroyed)));
        assert!(next_state(Destroying, Action::Observed(Started)).is_err());
        assert!(next_state(Destroyed, Action::Observed(Started)).is_err());
        assert!(next_state(Started, Action::Observed(Created)).is_err());
        assert!(next_state(Started, Action::Observed(Destroying)).is_err());
        // A broker's suspend finishing, or one a host admin made.
        assert_eq!(next_state(Suspending, Action::Observed(Suspended)), Ok(Some(Suspended)));
        assert_eq!(next_state(Started, Action::Observed(Suspended)), Ok(Some(Suspended)));
    }

    #[test]
    fn only_a_started_machine_is_branched() {
        for state in MachineState::ALL {
            assert_eq!(can_branch(state).is_ok(), state == Started, "{state}");
        }
        let refused = can_branch(Stopped).unwrap_err().to_string();
        assert_eq!(
            refused,
            "cannot branch a machine that is stopped: it is not running (a branch copies a running guest; start it first)"
        );
    }

    #[test]
    fn running_states_pin_a_machine_to_its_host() {
        let running: Vec<_> = MachineState::ALL.into_iter().filter(|s| s.may_be_running()).collect();
        assert_eq!(running, [Starting, Started, Stopping, Suspending, Destroying]);
    }
}
