//! Scheduling priority for the threads that work after the answer has gone: the SQLite ledger
//! writer, the audit log's compressor, the telemetry exporter and the alerts loop.
//!
//! They run [`NICENESS`] steps nicer than the process. The proxy's workers then get the larger
//! share of a busy core, so a writer flushing a large batch takes less of it from clients.
//! Niceness 5 weighs a thread at about a third of a worker: on a saturated core it still gets
//! a fifth of the time, more than the ledger writer needs per request, so its queue does not
//! grow without bound.
//!
//! Not lowered, on purpose: the audit writer (its queue is bounded and drops lines when full,
//! so starving it would lose records) and the PostgreSQL store's runtime (it also serves the
//! budget reseed and sign-in queries that requests wait on).

/// How much nicer than the process the background threads run.
pub const NICENESS: i32 = 5;

/// Starts a named thread that runs at the background priority from its first instruction.
pub fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<T>> {
    std::thread::Builder::new().name(name.into()).spawn(move || {
        lower_priority();
        f()
    })
}

/// Sets the calling thread to the process's niceness plus [`NICENESS`] (Linux sets niceness per
/// thread, and a thread inherits its creator's: the target is absolute, so a thread started by
/// a lowered one is not lowered twice). Failing to is logged and otherwise harmless: the thread
/// runs at the process's priority.
pub fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        let result = process_niceness().and_then(|base| {
            // SAFETY: a plain syscall on the calling thread's own id.
            let tid = unsafe { libc::gettid() } as libc::id_t;
            match unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, (base + NICENESS).min(19)) } {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot lower a background thread's priority; it runs at the proxy's");
        }
    }
}

/// The main thread's niceness, which is what `nice` and systemd's `Nice=` set for the process.
#[cfg(target_os = "linux")]
fn process_niceness() -> std::io::Result<i32> {
    // SAFETY: plain syscalls; errno is thread-local, cleared first because -1 is a valid answer.
    unsafe {
        *libc::__errno_location() = 0;
        let n = libc::getpriority(libc::PRIO_PROCESS, libc::getpid() as libc::id_t);
        if n == -1 && *libc::__errno_location() != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n)
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn thread_niceness() -> i32 {
        // SAFETY: as above.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
    }

    #[test]
    fn a_background_thread_is_nicer_than_the_process_once_and_only_it() {
        let base = process_niceness().unwrap();
        let before = thread_niceness();
        let (inside, grandchild) = std::thread::spawn(|| {
            lower_priority();
            let inside = thread_niceness();
            // A thread started by a lowered one, lowering itself too, ends at the same level.
            let grandchild = std::thread::spawn(|| {
                lower_priority();
                thread_niceness()
            })
            .join()
            .unwrap();
            (inside, grandchild)
        })
        .join()
        .unwrap();
        assert_eq!(inside, (base + NICENESS).min(19));
        assert_eq!(grandchild, inside);
        assert_eq!(thread_niceness(), before, "the spawning thread keeps its priority");
    }
}
