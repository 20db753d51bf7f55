//! How a command run through `Vm.exec` ended: the one reading and writing
//! of `ExecOutput.exit (code, signal, error)` that the broker (writing),
//! the controller and mmctl (reading) share, so the three cannot disagree
//! on which field wins.

use crate::broker_capnp::exec_output;

/// The end of an exec, as `ExecOutput.exit` carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEnd {
    /// It exited with this status.
    Code(i32),
    /// A signal ended it.
    Signal(i32),
    /// It could not run at all (or the agent's connection broke).
    Error(String),
}

impl ExecEnd {
    /// Reads `exit`'s parameters: a non-empty `error` wins, then a non-zero
    /// `signal`, else `code`.
    pub fn read(params: exec_output::exit_params::Reader<'_>) -> capnp::Result<ExecEnd> {
        let error = params.get_error()?.to_string().unwrap_or_default();
        Ok(if !error.is_empty() {
            ExecEnd::Error(error)
        } else if params.get_signal() != 0 {
            ExecEnd::Signal(params.get_signal())
        } else {
            ExecEnd::Code(params.get_code())
        })
    }

    /// Fills `exit`'s parameters (the inverse of [`ExecEnd::read`]).
    pub fn write(&self, mut params: exec_output::exit_params::Builder<'_>) {
        match self {
            ExecEnd::Code(code) => params.set_code(*code),
            ExecEnd::Signal(signal) => params.set_signal(*signal),
            ExecEnd::Error(error) => params.set_error(error),
        }
    }

    /// The exit code a shell would report: the status, or 128 + N after
    /// signal N; `None` for an error.
    pub fn shell_code(&self) -> Option<i32> {
        match self {
            ExecEnd::Code(code) => Some(*code),
            ExecEnd::Signal(signal) => Some(128 + signal),
            ExecEnd::Error(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ExecEnd;
    use crate::broker_capnp::exec_output;

    fn round_trip(end: &ExecEnd) -> ExecEnd {
        let mut message = capnp::message::Builder::new_default();
        end.write(message.init_root::<exec_output::exit_params::Builder<'_>>());
        let reader = message.get_root_as_reader::<exec_output::exit_params::Reader<'_>>().unwrap();
        ExecEnd::read(reader).unwrap()
    }

    #[test]
    fn reads_what_it_writes() {
        for end in [ExecEnd::Code(0), ExecEnd::Code(4), ExecEnd::Signal(9), ExecEnd::Error("no such file".into())] {
            assert_eq!(round_trip(&end), end);
        }
        assert_eq!(ExecEnd::Signal(9).shell_code(), Some(137));
        assert_eq!(ExecEnd::Code(4).shell_code(), Some(4));
        assert_eq!(ExecEnd::Error("x".into()).shell_code(), None);
    }
}
