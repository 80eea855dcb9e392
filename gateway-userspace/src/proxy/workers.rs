//! The data-path threads: one single-threaded tokio runtime per CPU, each serving the
//! connections handed to it for their whole life (thread-per-core, as nginx's workers
//! and Envoy's do).
//!
//! With one multi-threaded runtime, the tasks of one request (the HTTP/2 stream, the
//! upstream connection, the body) hop between worker threads, and every hop is a futex
//! wake-up and a context switch; on the 2-CPU benchmark machine that scheduling cost a
//! quarter of the gateway's CPU time per request (docs/benchmarks.md). Here a connection's
//! socket is registered with its worker's own reactor, its HTTP/2 streams are spawned on
//! that worker, and the worker has its own upstream connection pool
//! ([`super::Proxy::upstream`]), so a request runs start to end on one thread. The price:
//! one busy connection cannot use two CPUs (kubectl and client-go open a connection per
//! client, so many agents spread over the workers).
//!
//! Everything else (recorder, admin, policy reload, approvals, Kubernetes watches) stays
//! on the shared runtime; the data path talks to it through channels, which work across
//! runtimes.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::TcpStream;
use tokio::sync::mpsc;

type Job = Box<dyn FnOnce() + Send>;

thread_local! {
    /// The index of the data-path worker running on this thread.
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The index of the data-path worker running the caller, if it runs on one.
pub(super) fn current() -> Option<usize> {
    CURRENT.with(Cell::get)
}

/// `workers` as configured, or one per CPU the process may use when `0`.
pub(super) fn resolve(workers: usize) -> usize {
    if workers > 0 {
        return workers;
    }
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// The running data-path threads.
pub(super) struct Workers {
    queues: Vec<mpsc::UnboundedSender<Job>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    next: AtomicUsize,
}

impl Workers {
    /// Starts `count` threads (at least one), each with a current-thread runtime.
    pub(super) fn start(count: usize) -> std::io::Result<Workers> {
        let mut queues = Vec::new();
        let mut threads = Vec::new();
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (queue, mut jobs) = mpsc::unbounded_channel::<Job>();
            let thread = std::thread::Builder::new()
                .name(format!("chaperone-dp-{index}"))
                .spawn(move || {
                    CURRENT.with(|c| c.set(Some(index)));
                    // Jobs spawn their tasks on this runtime; once the queue closes (the
                    // listener's drain is over, every connection tracked there is done),
                    // what is left (idle upstream connections) is dropped with it.
                    runtime.block_on(async move {
                        while let Some(job) = jobs.recv().await {
                            job();
                        }
                    });
                })?;
            queues.push(queue);
            threads.push(thread);
        }
        Ok(Workers {
            queues,
            threads,
            next: AtomicUsize::new(0),
        })
    }

    /// Moves `tcp` to the next worker (round robin) and runs `serve(tcp)` there.
    pub(super) fn spawn<F, Fut>(&self, tcp: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let std = match tcp.into_std() {
            Ok(std) => std,
            Err(error) => {
                tracing::warn!(%error, "cannot hand a connection to a data-path thread; closing it");
                return;
            }
        };
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.queues.len();
        let job: Job = Box::new(move || match TcpStream::from_std(std) {
            Ok(tcp) => {
                tokio::spawn(serve(tcp));
            }
            Err(error) => {
                tracing::warn!(%error, "cannot register a connection with its data-path thread; closing it");
            }
        });
        if self.queues[index].send(job).is_err() {
            tracing::error!(
                worker = index,
                "a data-path thread is gone; the connection is closed"
            );
        }
    }

    /// Closes the queues and waits for the threads to end (call once every connection
    /// handed out is done).
    pub(super) async fn stop(self) {
        drop(self.queues);
        let threads = self.threads;
        let joined = tokio::task::spawn_blocking(move || {
            for thread in threads {
                if thread.join().is_err() {
                    tracing::error!("a data-path thread panicked");
                }
            }
        })
        .await;
        if let Err(error) = joined {
            tracing::error!(%error, "waiting for the data-path threads failed");
        }
    }
}
