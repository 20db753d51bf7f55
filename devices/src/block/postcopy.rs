//! The block back end's side of a lazy restore: vhost-user "postcopy"
//! (protocol feature PAGEFAULT, offered only with `mm-device --lazy-memory`;
//! see [`crate::lazy_memory`]).
//!
//! Guest RAM then starts as an empty memfd that mm-vmm fills on demand. This
//! process maps the same memfd, and the first touch of a page here (a ring,
//! a descriptor, a request's data, which `pread`/`pwrite` reach from the
//! kernel) must wait for mm-vmm to fill it instead of finding a fresh zero
//! page. The vhost-user spec's postcopy sequence arranges that:
//!
//! 1. POSTCOPY_ADVISE: [`Postcopy::advise`] creates a userfaultfd in this
//!    process (a userfaultfd serves the address space of the process that
//!    created it) and the front end gets a copy, which it reads fault
//!    events from;
//! 2. POSTCOPY_LISTEN: [`Postcopy::listen`]; memory tables from now on are
//!    registered;
//! 3. SET_MEM_TABLE: [`Postcopy::map_pending`] maps the regions, registers
//!    each mapping for missing pages, and keeps the table pending; the
//!    reply carries our mapping bases, which the front end needs to tell
//!    which guest page a fault address is;
//! 4. the front end's ack (SET_MEM_TABLE with a u64 0, once it is ready to
//!    serve our faults): [`Postcopy::take_pending`], and the handler
//!    publishes the table to the rings;
//! 5. POSTCOPY_END: [`Postcopy::end`] drops our copy of the userfaultfd.
//!
//! Registration happens before anything can use the table: a page touched
//! through an unregistered mapping would be allocated zeroed in the memfd
//! behind mm-vmm's back, and the guest's real data could no longer be
//! placed there.
//!
//! A front end that hangs up while the worker waits on a page leaves it
//! waiting: the hang-up joins the worker, and our copy of the userfaultfd
//! stays open, so the worker never goes on with a zero page in place of
//! the guest's data (writing it to the disk). The process then ends when it
//! is killed (the broker SIGKILLs a device 2 s after mm-vmm has exited).

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::Arc;

use userfaultfd::{Uffd, UffdBuilder};
use vhost::vhost_user::message::VhostUserMemoryRegion;

use super::dirty_log::DirtyLog;
use super::memory::{MemoryError, MemoryTable};

#[derive(Debug, thiserror::Error)]
pub enum PostcopyError {
    #[error("POSTCOPY_ADVISE twice: this session already has a userfaultfd")]
    AlreadyAdvised,
    #[error("POSTCOPY_LISTEN before POSTCOPY_ADVISE: there is no userfaultfd to register memory with")]
    NotAdvised,
    #[error("a postcopy memory table before POSTCOPY_LISTEN")]
    NotListening,
    #[error("the front end acked postcopy memory regions, but no memory table is waiting for its ack")]
    NothingPending,
    #[error("cannot create a userfaultfd (/dev/userfaultfd; a jailed mm-device holds it only with --lazy-memory): {0}")]
    Create(userfaultfd::Error),
    #[error("cannot duplicate the userfaultfd for the front end: {0}")]
    Dup(std::io::Error),
    #[error(transparent)]
    Map(#[from] MemoryError),
    #[error("cannot register guest memory at {gpa:#x} (+{size:#x}) with the userfaultfd: {source}")]
    Register { gpa: u64, size: u64, source: userfaultfd::Error },
}

/// Postcopy state of one vhost-user session. The vhost crate checks the
/// order of the POSTCOPY_* messages too; this checks it again because the
/// handler's methods are its own API (and its tests call them directly).
#[derive(Debug, Default)]
pub struct Postcopy {
    /// Our userfaultfd, from POSTCOPY_ADVISE until POSTCOPY_END.
    uffd: Option<Uffd>,
    listening: bool,
    /// Mapped and registered, waiting for the front end's ack.
    pending: Option<MemoryTable>,
}

impl Postcopy {
    /// POSTCOPY_ADVISE: creates the userfaultfd and returns a copy of it
    /// for the front end.
    ///
    /// Non-blocking and close-on-exec as the `vhost-user-backend` crate
    /// makes its own; not user-mode-only, because this back end's disk I/O
    /// reads and writes guest pages from the kernel (`pread`/`pwrite`
    /// straight into the mapping) and those faults must reach the front end
    /// too. `UffdBuilder` opens `/dev/userfaultfd`, which grants exactly
    /// that to whoever may open the node; the userfaultfd(2) syscall it
    /// falls back to when the node is absent would need CAP_SYS_PTRACE
    /// (vm.unprivileged_userfaultfd=0), and the seccomp policy forbids it.
    pub fn advise(&mut self) -> Result<File, PostcopyError> {
        if self.uffd.is_some() {
            return Err(PostcopyError::AlreadyAdvised);
        }
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(PostcopyError::Create)?;
        // A second descriptor of the same userfaultfd (F_DUPFD_CLOEXEC): the
        // front end's copy leaves with the reply, ours stays for registering.
        let copy = uffd.as_fd().try_clone_to_owned().map_err(PostcopyError::Dup)?;
        self.uffd = Some(uffd);
        Ok(File::from(copy))
    }

    /// POSTCOPY_LISTEN: memory tables from now on are registered.
    pub fn listen(&mut self) -> Result<(), PostcopyError> {
        if self.uffd.is_none() {
            return Err(PostcopyError::NotAdvised);
        }
        self.listening = true;
        Ok(())
    }

    /// SET_MEM_TABLE while listening: maps the regions and registers every
    /// mapping for missing pages, without huge pages (a huge page would
    /// fill its 511 neighbours with no fault for the front end to serve).
    /// Returns this process's mapping base per region, in message order;
    /// the table waits for [`Postcopy::take_pending`]. A table still
    /// waiting is replaced (unmapped).
    pub fn map_pending(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
        log: &Arc<DirtyLog>,
    ) -> Result<Vec<u64>, PostcopyError> {
        let Some(uffd) = self.uffd.as_ref().filter(|_| self.listening) else {
            return Err(PostcopyError::NotListening);
        };
        let table = MemoryTable::map(regions, files, log)?;
        for mapping in table.local_mappings() {
            let (addr, len) = (mapping.addr as *mut libc::c_void, mapping.size as usize);
            // SAFETY: madvise on a mapping this table owns; it changes how
            // the range is backed, not its contents.
            if unsafe { libc::madvise(addr, len, libc::MADV_NOHUGEPAGE) } != 0 {
                tracing::warn!(
                    gpa = mapping.gpa,
                    "block: cannot turn off huge pages for lazily restored memory: {}",
                    std::io::Error::last_os_error()
                );
            }
            uffd.register(addr, len).map_err(|source| PostcopyError::Register {
                gpa: mapping.gpa,
                size: mapping.size,
                source,
            })?;
        }
        let bases = table.local_mappings().map(|m| m.addr).collect();
        self.pending = Some(table);
        Ok(bases)
    }

    /// The front end's ack: the table it acked, now safe to publish.
    pub fn take_pending(&mut self) -> Result<MemoryTable, PostcopyError> {
        self.pending.take().ok_or(PostcopyError::NothingPending)
    }

    /// The table waiting for the front end's ack, if any (a dirty log must
    /// cover it too).
    pub fn pending(&self) -> Option<&MemoryTable> {
        self.pending.as_ref()
    }

    /// Drops a table still waiting for its ack (an ordinary SET_MEM_TABLE
    /// replaces everything).
    pub fn discard_pending(&mut self) {
        self.pending = None;
    }

    /// POSTCOPY_END: drops our userfaultfd (the registrations last as long
    /// as the front end keeps its copy open) and returns a table that was
    /// never acked, for the handler to publish as the `vhost-user-backend`
    /// crate does.
    pub fn end(&mut self) -> Option<MemoryTable> {
        self.uffd = None;
        self.listening = false;
        self.pending.take()
    }
}
