//! The 16550 console (vm-superio) with its interrupt on an irqfd, writing
//! the guest's console to stdout, a file, or nowhere.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;

use vm_superio::{Serial, Trigger, serial::NoEvents};
use vmm_sys_util::eventfd::EventFd;

/// An eventfd that vm-superio devices raise: an IRQ line (through a KVM
/// irqfd) for the serial port, a reset request for the i8042.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where the console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialOutput {
    Stdout,
    File(PathBuf),
    Discard,
}

impl std::str::FromStr for SerialOutput {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" => Err("empty serial output".into()),
            "stdout" | "-" => Ok(SerialOutput::Stdout),
            "none" => Ok(SerialOutput::Discard),
            path => Ok(SerialOutput::File(PathBuf::from(path))),
        }
    }
}

/// Writes the console unbuffered, so nothing is lost when mm-vmm exits
/// straight after the guest resets.
pub struct ConsoleWriter(Box<dyn Write + Send>);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.0.write(buf)?;
        self.0.flush()?;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

pub type SerialConsole = Serial<EventFdTrigger, NoEvents, ConsoleWriter>;

impl SerialOutput {
    pub fn open(&self) -> std::io::Result<ConsoleWriter> {
        let sink: Box<dyn Write + Send> = match self {
            SerialOutput::Stdout => Box::new(std::io::stdout()),
            SerialOutput::File(path) => Box::new(File::create(path)?),
            SerialOutput::Discard => Box::new(std::io::sink()),
        };
        Ok(ConsoleWriter(sink))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_outputs() {
        assert_eq!("stdout".parse::<SerialOutput>().unwrap(), SerialOutput::Stdout);
        assert_eq!("none".parse::<SerialOutput>().unwrap(), SerialOutput::Discard);
        assert_eq!("/tmp/x".parse::<SerialOutput>().unwrap(), SerialOutput::File("/tmp/x".into()));
        assert!("".parse::<SerialOutput>().is_err());
    }
}
