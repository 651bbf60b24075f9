//! The scheduler: takes queued runs in the order added, at most `concurrency` at a time,
//! runs them on the processor and records how they ended. Runs move in batches: one
//! transaction claims many queued runs, one transaction records many finished ones.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};

use super::processor::{Job, Processor};
use super::store::{Claimed, Finished, Outcome, Store, StoreError};
use crate::api::TaskSpec;

/// Most finished runs recorded in one transaction.
const FINISH_BATCH: usize = 4096;
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
        let (tx, mut rx) = mpsc::unbounded_channel::<Finished>();
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
                for c in recovered {
                    self.dispatch(c, &mut specs, &tx);
                    in_flight += 1;
                }
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
                        for c in claimed {
                            self.dispatch(c, &mut specs, &tx);
                            in_flight += 1;
                        }
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
                    // Let runs finishing at the same moment join this batch.
                    tokio::task::yield_now().await;
                    let mut batch = vec![first];
                    while batch.len() < FINISH_BATCH {
                        match rx.try_recv() {
                            Ok(f) => batch.push(f),
                            Err(_) => break,
                        }
                    }
                    in_flight -= batch.len();
                    if !self.record(batch).await {
                        return;
                    }
                    self.changed();
                }
                _ = self.wake.notified(), if in_flight < concurrency => {}
            }
        }
    }

    /// Records finished runs, retrying until it works or the server stops (a run that is
    /// not recorded stays `running` and is executed again after a restart).
    async fn record(&mut self, batch: Vec<Finished>) -> bool {
        let batch = Arc::new(batch);
        loop {
            let b = batch.clone();
            match self.blocking(move |s| s.finish(&b)).await {
                Ok(()) => return true,
                Err(e) => {
                    tracing::error!(error = %e, "cannot record finished runs; retrying");
                    tokio::select! {
                        _ = self.shutdown.changed() => return false,
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

    fn dispatch(
        &self,
        c: Claimed,
        specs: &mut HashMap<i64, Option<Arc<TaskSpec>>>,
        tx: &mpsc::UnboundedSender<Finished>,
    ) {
        let spec = match (c.spec_id, &c.spec) {
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
        };
        let processor = self.processor.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let input = serde_json::from_str::<serde_json::Value>(&c.input)
                .ok()
                .and_then(|mut v| v.get_mut("input").map(serde_json::Value::take));
            let outcome = match input {
                None => failure("the stored input of this run cannot be read", None),
                Some(input) => {
                    let job = Job {
                        processor: c.processor,
                        input,
                        spec,
                    };
                    match processor.process(&job).await {
                        Ok(output) => match serde_json::to_string(&output) {
                            Ok(text) => Outcome::Completed(text),
                            Err(e) => failure(&format!("cannot encode the output: {e}"), None),
                        },
                        Err(f) => failure(&f.message, f.detail),
                    }
                }
            };
            let _ = tx.send(Finished {
                seq: c.seq,
                gseq: c.gseq,
                outcome,
            });
        });
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
