//! Progress of a run: indicatif bars on a terminal, plain lines elsewhere, and the counts
//! the final summary is made from.
//!
//! Everything is written to stderr. Lines go through [`Progress::println`], which suspends
//! the bars while printing: indicatif's own `println` prints nothing when the bars are
//! hidden (stderr not a terminal), which would swallow every message in CI.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::api::RunStatus;
use crate::ledger::ClaimCounts;
use crate::sql::{EnrichProgress, Phase, ProgressFn};

/// Shortest time between two plain progress lines of one task.
const LINE_INTERVAL: Duration = Duration::from_secs(5);

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// Bars when stderr is a terminal, lines otherwise.
    Auto,
    /// Bars (redrawn in place).
    Bars,
    /// One plain line per change, at most every few seconds per task.
    Lines,
    /// Nothing but errors and the summary.
    Quiet,
}

/// What one task did, for the summary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskReport {
    pub task: String,
    pub group_ids: Vec<String>,
    /// Runs added to the groups.
    pub submitted: u64,
    /// What the rows were claimed as: new runs, shared within the run, resumed, cached.
    pub claims: ClaimCounts,
    pub completed: u64,
    pub failed: u64,
    /// Runs that ended neither completed nor failed (cancelled, or unknown statuses).
    pub other: u64,
}

struct TaskState {
    report: TaskReport,
    phase: Phase,
    counts: BTreeMap<String, u64>,
    bar: Option<ProgressBar>,
    last_line: Option<Instant>,
    started: Instant,
}

struct Inner {
    /// By task name and execution: one task may be called by several steps.
    tasks: BTreeMap<(String, u64), TaskState>,
}

/// The progress display of one run. Cheap to clone; all clones share state.
#[derive(Clone)]
pub struct Progress {
    inner: Arc<Mutex<Inner>>,
    bars: Option<MultiProgress>,
    quiet: bool,
}

impl Progress {
    /// A display in `mode` (`Auto` looks at whether stderr is a terminal).
    pub fn new(mode: ProgressMode) -> Progress {
        let bars = match mode {
            ProgressMode::Bars => true,
            ProgressMode::Auto => std::io::stderr().is_terminal(),
            ProgressMode::Lines | ProgressMode::Quiet => false,
        };
        Progress {
            inner: Arc::new(Mutex::new(Inner {
                tasks: BTreeMap::new(),
            })),
            bars: bars.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
            quiet: mode == ProgressMode::Quiet,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock only loses a progress update; keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Prints one line on stderr without tearing the bars.
    pub fn println(&self, line: impl AsRef<str>) {
        if self.quiet {
            return;
        }
        let line = line.as_ref();
        match &self.bars {
            Some(m) => m.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }

    /// The callback that feeds enrich progress into this display.
    pub fn enrich_callback(&self) -> ProgressFn {
        let me = self.clone();
        Arc::new(move |p: &EnrichProgress| me.on_enrich(p))
    }

    /// Takes one enrich progress report.
    pub fn on_enrich(&self, p: &EnrichProgress) {
        let mut lines = Vec::new();
        {
            let mut inner = self.lock();
            let key = (p.task.clone(), p.execution);
            let state = inner.tasks.entry(key).or_insert_with(|| TaskState {
                report: TaskReport {
                    task: p.task.clone(),
                    ..TaskReport::default()
                },
                phase: p.phase,
                counts: BTreeMap::new(),
                bar: None,
                last_line: None,
                started: Instant::now(),
            });
            if let Some(g) = &p.group_id
                && !state.report.group_ids.contains(g)
            {
                state.report.group_ids.push(g.clone());
                lines.push(format!("task {}: group {g}", p.task));
            }
            state.report.submitted = state.report.submitted.max(p.runs_added);
            state.report.claims = p.claims;
            if let Some(status) = &p.status {
                state.counts = status.task_run_status_counts.clone();
                let count = |s: RunStatus| status.count(&s);
                // Runs still queued or running at the end did not finish: they count as
                // neither completed nor failed.
                state.report.completed = count(RunStatus::Completed);
                state.report.failed = count(RunStatus::Failed);
                state.report.other = status
                    .num_task_runs
                    .saturating_sub(state.report.completed + state.report.failed)
                    .saturating_sub(
                        count(RunStatus::Queued)
                            + count(RunStatus::Running)
                            + count(RunStatus::ActionRequired)
                            + count(RunStatus::Cancelling),
                    );
            }
            let phase_changed = state.phase != p.phase;
            state.phase = p.phase;
            match &self.bars {
                Some(multi) => {
                    let bar = state
                        .bar
                        .get_or_insert_with(|| new_bar(multi, &p.task))
                        .clone();
                    bar.set_length(state.report.submitted);
                    bar.set_position(state.report.completed + state.report.failed);
                    bar.set_message(status_text(state));
                    if p.phase == Phase::Reading && !bar.is_finished() {
                        bar.finish_with_message(format!(
                            "{} · reading results",
                            status_text(state)
                        ));
                    }
                }
                None => {
                    let due = state.last_line.is_none_or(|t| t.elapsed() >= LINE_INTERVAL);
                    if phase_changed || due {
                        state.last_line = Some(Instant::now());
                        lines.push(format!(
                            "task {}: {} · {}",
                            p.task,
                            phase_word(p.phase),
                            status_text(state)
                        ));
                    }
                }
            }
        }
        for line in lines {
            self.println(line);
        }
    }

    /// Says that step `name` is starting.
    pub fn step_started(&self, index: usize, total: usize, name: &str) {
        self.println(format!("step {}/{total} `{name}`: running", index + 1));
    }

    /// Says that step `name` is done.
    pub fn step_done(&self, index: usize, total: usize, name: &str, rows: u64, took: Duration) {
        self.println(format!(
            "step {}/{total} `{name}`: {rows} row(s) in {:.1}s",
            index + 1,
            took.as_secs_f64()
        ));
    }

    /// Removes the bars (the summary follows) and returns every task's counts, summed over
    /// its groups.
    pub fn finish(&self) -> Vec<TaskReport> {
        let inner = self.lock();
        let mut out: BTreeMap<&str, TaskReport> = BTreeMap::new();
        for ((task, _), state) in &inner.tasks {
            if let Some(bar) = &state.bar
                && !bar.is_finished()
            {
                bar.finish();
            }
            let r = out.entry(task).or_insert_with(|| TaskReport {
                task: task.clone(),
                ..TaskReport::default()
            });
            for g in &state.report.group_ids {
                if !r.group_ids.contains(g) {
                    r.group_ids.push(g.clone());
                }
            }
            r.submitted += state.report.submitted;
            r.claims.submit += state.report.claims.submit;
            r.claims.duplicate += state.report.claims.duplicate;
            r.claims.resumed += state.report.claims.resumed;
            r.claims.cached += state.report.claims.cached;
            r.completed += state.report.completed;
            r.failed += state.report.failed;
            r.other += state.report.other;
        }
        out.into_values().collect()
    }
}

fn new_bar(multi: &MultiProgress, task: &str) -> ProgressBar {
    let style = ProgressStyle::with_template(
        "{prefix:.bold} [{bar:28.cyan/blue}] {pos}/{len} {msg} · ETA {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let bar = multi.add(ProgressBar::new(0).with_style(style));
    bar.set_prefix(task.to_string());
    bar.enable_steady_tick(Duration::from_millis(250));
    bar
}

fn phase_word(phase: Phase) -> &'static str {
    match phase {
        Phase::Submitting => "submitting",
        Phase::Running => "running",
        Phase::Reading => "reading results",
    }
}

fn status_text(state: &TaskState) -> String {
    let c = |s: &str| state.counts.get(s).copied().unwrap_or(0);
    let done = state.report.completed + state.report.failed;
    let secs = state.started.elapsed().as_secs_f64();
    let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
    let saved = state.report.claims.saved();
    let mut text = if saved > 0 {
        format!("saved {saved} · ")
    } else {
        String::new()
    };
    text.push_str(&format!(
        "submitted {} · queued {} · running {} · completed {} · failed {}",
        state.report.submitted,
        c("queued"),
        c("running"),
        state.report.completed,
        state.report.failed
    ));
    text.push_str(&format!(" · {rate:.1}/s"));
    // Bars show indicatif's own ETA; lines carry one computed from the same rate.
    let left = state.report.submitted.saturating_sub(done);
    if state.bar.is_none() && rate > 0.0 && left > 0 {
        text.push_str(&format!(" · ETA {:.0}s", left as f64 / rate));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::TaskGroupStatus;

    fn report(phase: Phase, added: u64, counts: &[(&str, u64)]) -> EnrichProgress {
        EnrichProgress {
            task: "research".into(),
            execution: 1,
            group_id: Some("tgrp_1".into()),
            phase,
            runs_added: added,
            claims: ClaimCounts {
                submit: added,
                ..ClaimCounts::default()
            },
            status: Some(TaskGroupStatus {
                num_task_runs: added,
                task_run_status_counts: counts.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                is_active: phase != Phase::Reading,
                status_message: None,
                modified_at: None,
            }),
        }
    }

    #[test]
    fn counts_reach_the_summary() {
        let p = Progress::new(ProgressMode::Quiet);
        p.on_enrich(&report(Phase::Submitting, 10, &[("queued", 10)]));
        p.on_enrich(&report(
            Phase::Running,
            20,
            &[("running", 5), ("completed", 14), ("failed", 1)],
        ));
        p.on_enrich(&report(
            Phase::Reading,
            20,
            &[("completed", 18), ("failed", 1), ("cancelled", 1)],
        ));
        let r = p.finish();
        assert_eq!(
            r,
            vec![TaskReport {
                task: "research".into(),
                group_ids: vec!["tgrp_1".into()],
                submitted: 20,
                claims: ClaimCounts {
                    submit: 20,
                    ..ClaimCounts::default()
                },
                completed: 18,
                failed: 1,
                other: 1,
            }]
        );
    }
}
