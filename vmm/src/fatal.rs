//! A panic anywhere in mm-vmm ends the process at once with status 125 and
//! one line naming the cause.
//!
//! Why not unwind: the legacy and virtio devices sit behind mutexes that
//! every vCPU thread takes on an MMIO or PIO exit. A device handler that
//! panics while holding one poisons it, and each vCPU then panics in turn on
//! its next exit, burying the first message under a cascade; the main thread
//! may wait on the dead vCPUs forever. A guest-visible machine whose devices
//! are in an unknown state cannot be trusted to run on, so the only safe end
//! is the VMM's own failure status (125, as `docker run` uses for its own
//! errors), with the cause as the last line of its log, which is where the
//! broker looks for the reason it records (`inspect`, audit log).

use std::io::Write;

/// The status mm-vmm exits with when it fails itself.
pub const VMM_FAILURE: i32 = 125;

/// Installs the hook; call once, first thing in `main`, before any thread
/// starts.
pub fn exit_on_panic() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        // One write(2) of one line: the vCPU threads' seccomp filter allows
        // write and exit_group, and nothing else here may allocate a lock a
        // poisoned thread still holds.
        let line = format!("mm-vmm: internal error in thread '{name}': {what}{at}; the microVM stops\n");
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
        // SAFETY: _exit(2) ends the whole process (exit_group) without
        // running destructors or atexit handlers, which could block on the
        // locks of the thread that panicked; it has no other preconditions.
        unsafe { libc::_exit(VMM_FAILURE) };
    }));
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::sync::{Arc, Mutex};

    /// The child half of `a_panic_in_a_device_thread_ends_the_process_with_125`:
    /// a "device" thread panics while holding the bus lock, as a device
    /// handler would, and a "vCPU" then takes the poisoned lock.
    #[test]
    fn panicking_child() {
        if std::env::var_os("MM_FATAL_CHILD").is_none() {
            return;
        }
        super::exit_on_panic();
        let bus = Arc::new(Mutex::new(0u32));
        let device = Arc::clone(&bus);
        let handler = std::thread::Builder::new()
            .name("vcpu 0".into())
            .spawn(move || {
                let _held = device.lock().unwrap();
                panic!("device handler failed on purpose");
            })
            .unwrap();
        let _ = handler.join();
        // Not reached with the hook: the process is gone.
        let _poisoned = bus.lock().expect("virtio lock");
        std::process::exit(0);
    }

    #[test]
    fn a_panic_in_a_device_thread_ends_the_process_with_125() {
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "fatal::tests::panicking_child", "--nocapture", "--test-threads", "1"])
            .env("MM_FATAL_CHILD", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(super::VMM_FAILURE), "stderr:\n{stderr}");
        let line = stderr.lines().find(|l| l.starts_with("mm-vmm: internal error")).unwrap_or_default();
        assert!(line.contains("thread 'vcpu 0': device handler failed on purpose at "), "stderr:\n{stderr}");
        // The first panic ends it: no cascade of poisoned-lock panics.
        assert!(!stderr.contains("PoisonError"), "stderr:\n{stderr}");
    }
}
