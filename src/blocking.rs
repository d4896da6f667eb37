//! Waiting, from synchronous code, for work on a runtime of its own: the shared limiter's and
//! the ledger database's connections live on dedicated runtimes, and their synchronous callers
//! (start-up, reloads, the admin API's blocking threads) wait on a plain channel, so no runtime
//! is ever entered from inside another.

/// Runs `f` on `rt` and waits for it. Any thread may call this but one of `rt`'s own.
pub fn block_on<T: Send + 'static>(
    rt: &tokio::runtime::Handle,
    f: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    rt.spawn(async move {
        let _ = tx.send(f.await);
    });
    rx.recv().expect("the runtime is running")
}
