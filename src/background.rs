//! Scheduling priority for the threads that work after the answer has gone: the ledger and
//! audit writers, the telemetry exporter and the alerts loop.
//!
//! They run [`NICENESS`] steps nicer than the process. The proxy's workers then win the core
//! whenever they have a request to serve, so a writer flushing a large batch delays other
//! writing, not a client. Niceness 5 weighs a writer at about a third of a worker: on a
//! saturated core it still gets a fifth of the time, more than the ledger and audit writers
//! need per request, so their queues do not grow without bound.

/// How much nicer than the process the background threads run.
pub const NICENESS: i32 = 5;

/// Lowers the calling thread's priority by [`NICENESS`] (Linux sets niceness per thread).
/// Failing to is logged and otherwise harmless: the thread runs at the process's priority.
pub fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain syscalls on the calling thread's own id; errno is thread-local.
        let result = unsafe {
            let tid = libc::gettid() as libc::id_t;
            *libc::__errno_location() = 0;
            let current = libc::getpriority(libc::PRIO_PROCESS, tid);
            if current == -1 && *libc::__errno_location() != 0 {
                Err(std::io::Error::last_os_error())
            } else if libc::setpriority(libc::PRIO_PROCESS, tid, (current + NICENESS).min(19)) != 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot lower a background thread's priority; it runs at the proxy's");
        }
    }
}

/// The calling thread's niceness.
#[cfg(target_os = "linux")]
pub fn niceness() -> i32 {
    // SAFETY: as above.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn a_background_thread_is_nicer_than_its_spawner_and_only_it() {
        let before = niceness();
        let inside = std::thread::spawn(|| {
            lower_priority();
            niceness()
        })
        .join()
        .unwrap();
        assert_eq!(inside, (before + NICENESS).min(19));
        assert_eq!(niceness(), before, "the spawning thread keeps its priority");
    }
}
