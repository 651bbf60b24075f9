//! The scheduler: takes queued runs in the order added, at most `concurrency` at a time,
//! runs them on the processor and records how they ended. Runs move in batches: one
//! transaction claims many queued runs, one transaction records many finished ones.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};

use super::processor::{Job, Processor, RunFailure};
use super::store::{Claimed, Finished, Outcome, Store, StoreError};
use crate::api::TaskSpec;

/// Most finished runs recorded in one transaction.
const FINISH_BATCH: usize = 4096;
/// Longest wait for more finished runs to record with the first (see [`gather`]).
const GATHER: Duration = Duration::from_millis(20);
/// The wait is at most this fraction (1/N) of the mean run time.
const GATHER_SHARE: u32 = 100;
/// Runs started between yields to the runtime (see [`Scheduler::dispatch_all`]).
const YIELD_EVERY: usize = 64;
/// Parsed task specs kept, by spec row id.
const SPEC_CACHE: usize = 4096;

/// What the scheduler needs from the server.
pub struct Scheduler {
    pub store: Arc<Store>,
    pub processor: Arc<dyn Processor>,
    pub concurrency: usize,
    /// Signalled when runs are added.
    pub wake: Arc<Notify>,
    /// Bumped after every change streams may want to see.
    pub changes: Arc<watch::Sender<u64>>,
    pub shutdown: watch::Receiver<bool>,
}

impl Scheduler {
    /// Runs until shutdown. Runs left `running` by a previous process are executed first.
    pub async fn run(mut self) {
        let concurrency = self.concurrency.max(1);
        let (tx, mut rx) = mpsc::unbounded_channel::<(Finished, Duration)>();
        // How long runs take, smoothed: the longest a batch waits for more is a share of it.
        let mut mean_run = Duration::ZERO;
        let mut specs: HashMap<i64, Option<Arc<TaskSpec>>> = HashMap::new();
        let mut in_flight = 0usize;
        match self.blocking(|s| s.running()).await {
            Ok(recovered) => {
                if !recovered.is_empty() {
                    tracing::info!(
                        runs = recovered.len(),
                        "resuming runs interrupted by a restart"
                    );
                }
                in_flight += self.dispatch_all(recovered, &mut specs, &tx);
            }
            Err(e) => tracing::error!(error = %e, "cannot read interrupted runs"),
        }
        loop {
            if in_flight < concurrency {
                let want = concurrency - in_flight;
                match self.blocking(move |s| s.claim(want)).await {
                    Ok(claimed) => {
                        if !claimed.is_empty() {
                            self.changed();
                        }
                        in_flight += self.dispatch_all(claimed, &mut specs, &tx);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot claim queued runs");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
            tokio::select! {
                biased;
                _ = self.shutdown.changed() => return,
                Some(first) = rx.recv() => {
                    let window = (mean_run / GATHER_SHARE).min(GATHER);
                    let timed = gather(first, &mut rx, in_flight, window).await;
                    let mut batch = Vec::with_capacity(timed.len());
                    for (f, took) in timed {
                        mean_run = (mean_run * 7 + took) / 8;
                        batch.push(f);
                    }
                    in_flight -= batch.len();
                    // Runs recovered after a restart may exceed a lowered concurrency.
                    let free = concurrency.saturating_sub(in_flight);
                    let Some(claimed) = self.record(batch, free).await else {
                        return;
                    };
                    self.changed();
                    in_flight += self.dispatch_all(claimed, &mut specs, &tx);
                }
                _ = self.wake.notified(), if in_flight < concurrency => {}
            }
        }
    }

    /// Records finished runs and claims up to `claim` queued ones in the same transaction,
    /// retrying until it works; `None` when the server stops first (a run that is not
    /// recorded stays `running` and is executed again after a restart).
    async fn record(&mut self, batch: Vec<Finished>, claim: usize) -> Option<Vec<Claimed>> {
        let batch = Arc::new(batch);
        loop {
            let b = batch.clone();
            match self.blocking(move |s| s.finish(&b, claim)).await {
                Ok(claimed) => return Some(claimed),
                Err(e) => {
                    tracing::error!(error = %e, "cannot record finished runs; retrying");
                    tokio::select! {
                        _ = self.shutdown.changed() => return None,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        }
    }

    fn changed(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .unwrap_or(Err(StoreError::Poisoned))
    }

    /// Starts the claimed runs; how many. One task starts a batch: runs that take no time
    /// are done there, between yields, rather than in a task each (spawned, woken and
    /// polled; with latency 0 and 100k runs the server's CPU fell by 7–14%), and a run that
    /// has to wait gets a task of its own. The scheduler goes on recording meanwhile.
    fn dispatch_all(
        &self,
        claimed: Vec<Claimed>,
        specs: &mut HashMap<i64, Option<Arc<TaskSpec>>>,
        tx: &mpsc::UnboundedSender<(Finished, Duration)>,
    ) -> usize {
        let n = claimed.len();
        let runs: Vec<(Claimed, Option<Arc<TaskSpec>>)> = claimed
            .into_iter()
            .map(|c| {
                let spec = spec_of(&c, specs);
                (c, spec)
            })
            .collect();
        let processor = self.processor.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            for (i, (c, spec)) in runs.into_iter().enumerate() {
                start(&processor, c, spec, &tx);
                // A batch of runs done at once is milliseconds of work: let other tasks in.
                if i % YIELD_EVERY == YIELD_EVERY - 1 {
                    tokio::task::yield_now().await;
                }
            }
        });
        n
    }
}

/// The parsed task spec of a claimed run, parsed once per spec row.
fn spec_of(c: &Claimed, specs: &mut HashMap<i64, Option<Arc<TaskSpec>>>) -> Option<Arc<TaskSpec>> {
    match (c.spec_id, &c.spec) {
        (Some(id), Some(text)) => {
            if specs.len() >= SPEC_CACHE {
                specs.clear();
            }
            specs
                .entry(id)
                .or_insert_with(|| serde_json::from_str::<TaskSpec>(text).ok().map(Arc::new))
                .clone()
        }
        _ => None,
    }
}

/// Runs a claimed run: at once if the processor needs no time for it, else in a task.
fn start(
    processor: &Arc<dyn Processor>,
    c: Claimed,
    spec: Option<Arc<TaskSpec>>,
    tx: &mpsc::UnboundedSender<(Finished, Duration)>,
) {
    let started = std::time::Instant::now();
    /// The part of a stored run input the processor needs; the rest (processor, metadata)
    /// is skipped rather than built into a tree and dropped.
    #[derive(serde::Deserialize)]
    struct Stored {
        input: serde_json::Value,
    }
    let input = serde_json::from_str::<Stored>(&c.input)
        .ok()
        .map(|s| s.input);
    let (seq, gseq) = (c.seq, c.gseq);
    let finish = move |outcome: Result<String, RunFailure>| {
        let finished = Finished {
            seq,
            gseq,
            outcome: outcome_of(outcome),
        };
        (finished, started.elapsed())
    };
    let Some(input) = input else {
        let _ = tx.send(finish(Err(RunFailure {
            message: "the stored input of this run cannot be read".to_string(),
            detail: None,
        })));
        return;
    };
    let job = Job {
        processor: c.processor,
        input,
        spec,
    };
    if let Some(outcome) = processor.process_now(&job) {
        let _ = tx.send(finish(outcome));
        return;
    }
    let processor = processor.clone();
    let tx = tx.clone();
    tokio::spawn(async move {
        let outcome = processor.process(&job).await;
        let _ = tx.send(finish(outcome));
    });
}

/// Runs finishing within `window` of `first` join its batch, unless every run in flight
/// has finished (or the batch is full) sooner. Each transaction rewrites every page it
/// touches (the runs', the events', the indexes' and the group's), so when
/// runs end a few at a time, as under latency, a transaction or two per run is costly: at
/// 1–3 s latency, 10k runs cost the server 9.3 CPU seconds; gathered, 3.1. The window is
/// a hundredth of the mean run time, at most [`GATHER`], so a slot waits at most about 1%
/// of a run's time to be refilled; when runs end all at once (no latency) the batch fills
/// without waiting.
async fn gather(
    first: (Finished, Duration),
    rx: &mut mpsc::UnboundedReceiver<(Finished, Duration)>,
    in_flight: usize,
    window: Duration,
) -> Vec<(Finished, Duration)> {
    let deadline = tokio::time::Instant::now() + window;
    let mut batch = vec![first];
    loop {
        while batch.len() < FINISH_BATCH {
            match rx.try_recv() {
                Ok(f) => batch.push(f),
                Err(_) => break,
            }
        }
        if batch.len() >= in_flight.min(FINISH_BATCH) {
            return batch;
        }
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(f)) => batch.push(f),
            _ => return batch,
        }
    }
}

/// How a run the processor answered ended, as stored.
pub(super) fn outcome_of(result: Result<String, RunFailure>) -> Outcome {
    match result {
        Ok(text) => Outcome::Completed(text),
        Err(f) => failure(&f.message, f.detail),
    }
}

fn failure(message: &str, detail: Option<serde_json::Value>) -> Outcome {
    let error = crate::api::ErrorObject {
        ref_id: crate::api::new_ref_id(),
        message: message.to_string(),
        detail,
    };
    Outcome::Failed(serde_json::to_string(&error).unwrap_or_else(|_| "null".to_string()))
}
