//! The engine that runs every workflow: take the node's lease, run its current step, carry out
//! what `policy::decide` makes of the result, and go on while there is something to do now.
//!
//! One step is one external side effect and one commit of its result, fenced by the node's
//! state, generation and lease, so a late worker cannot overwrite a newer result. A waiting step
//! never sleeps in a worker slot: it commits "look again at T" and a job for T, and returns.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rand::Rng;
use tracing::Instrument;
use uuid::Uuid;

use crate::cloud::{CloudError, CloudResult, Clouds};
use crate::config::{Chaos, WorkerConfig};
use crate::connections::{Conn, Connections};
use crate::model::Node;
use crate::policy::{self, Action, Intent, Rules, StepFacts, StepResult};
use crate::steps::run_step;
use crate::steps::{Outcome, Progress, ProgressFuture, StepContext};
use crate::store::{self, Failure, Lease, Postponed, StoreResult};

/// A job that arrives this much before its node's next run time is a duplicate and is dropped;
/// less than that is the queue's rounding of run times to whole seconds.
const EARLY_TOLERANCE: chrono::TimeDelta = chrono::TimeDelta::milliseconds(1500);

/// What the engine does after a step.
enum Next {
    /// The node rests or waits; this job is done.
    Stop,
    /// Take the lease again and read the node afresh (after a failure turned it to its undo).
    Reread,
    /// Run the node's next step from the row its commit returned.
    Run(Box<Node>),
}

pub struct Engine {
    /// The engine's own statements. Not sqlx's pool: that pings each connection after every
    /// use, a round trip more per statement (see `connections`).
    db: Connections,
    clouds: Arc<Clouds>,
    config: WorkerConfig,
}

impl Engine {
    /// `clouds` is shared with the worker's reconciler.
    pub fn new(db: Connections, clouds: Arc<Clouds>, config: WorkerConfig) -> Self {
        Self { db, clouds, config }
    }

    /// A connection for one statement or transaction.
    async fn conn(&self) -> StoreResult<Conn> {
        Ok(self.db.get().await?)
    }

    /// Runs the node's steps until it rests, must wait, or has failed; a resting node whose
    /// intent asks for a workflow starts it. Errors are only those of our own database; the
    /// job is then retried by the queue.
    pub async fn advance(&self, node_id: Uuid, job_id: &str) -> StoreResult<()> {
        let advanced = self.advance_as_far_as_possible(node_id, job_id).await;
        if advanced.is_err() {
            // A connection whose backend died (a restart, a failover) fails every statement:
            // check them all before their next use.
            self.db.suspect_all();
        }
        advanced
    }

    async fn advance_as_far_as_possible(&self, node_id: Uuid, job_id: &str) -> StoreResult<()> {
        let owner = Uuid::new_v4();
        // The node as the last step's commit left it: still leased, its next step's start
        // logged. `None`: take the lease and read the node afresh.
        let mut committed: Option<Node> = None;
        loop {
            let (node, start_logged) = if let Some(node) = committed.take() {
                (node, true)
            } else {
                let lease = self.config.pacing.lease;
                // Bound first: a scrutinee's temporaries (the connection) live through the match.
                let taken = store::acquire(&mut *self.conn().await?, node_id, owner, lease).await?;
                match taken {
                    Lease::Held(node) => (*node, false),
                    Lease::HeldElsewhere { until } => {
                        // Someone is on it; look again when their lease runs out, in case they died.
                        store::enqueue_later(
                            &mut *self.conn().await?,
                            node_id,
                            until + Duration::from_secs(1),
                        )
                        .await?;
                        return Ok(());
                    }
                    Lease::Gone => {
                        tracing::warn!(%node_id, job_id, "job for a node that does not exist");
                        return Ok(());
                    }
                }
            };
            if self.clouds.region(&node.region).is_none() {
                // Jobs go to their region's queue, which only workers of that region take;
                // this one came by another way (an old queue name). Hand it on, untouched.
                tracing::warn!(%node_id, job_id, region = %node.region, "node of a region this worker does not drive; handed to its region's queue");
                store::release(&mut *self.conn().await?, node_id, owner).await?;
                return store::enqueue_later(&mut *self.conn().await?, node_id, Duration::ZERO)
                    .await;
            }
            let state = node.state();
            if !state.has_step() {
                match policy::workflow_for(&Intent::of(&node, Utc::now())) {
                    Some(workflow) => {
                        tracing::info!(%node_id, job_id, from = %state, ?workflow, "intent starts a workflow");
                        if store::start_workflow(&mut *self.conn().await?, &node, owner, workflow)
                            .await?
                            .is_err()
                        {
                            return store::release(&mut *self.conn().await?, node_id, owner).await;
                        }
                        continue;
                    }
                    None => {
                        // A past-due grace that has not ended yet: be back when it does.
                        if let Some(until) = node.pending_grace_end(Utc::now()) {
                            store::enqueue_later(&mut *self.conn().await?, node_id, until).await?;
                        }
                        return store::rest(&mut *self.conn().await?, node_id, owner).await;
                    }
                }
            }
            if let Some(at) = node.next_run_at {
                if at - Utc::now() > EARLY_TOLERANCE {
                    // Another job is queued for that time.
                    return store::release(&mut *self.conn().await?, node_id, owner).await;
                }
            }
            let span = tracing::info_span!(
                "step",
                %node_id,
                job_id,
                step = %state,
                generation = node.generation,
                attempt = node.attempt,
                request_id = node.request_id.as_deref().unwrap_or_default(),
            );
            match self
                .run_one(&node, owner, start_logged)
                .instrument(span)
                .await?
            {
                Next::Stop => return Ok(()),
                Next::Reread => {}
                Next::Run(node) => committed = Some(*node),
            }
        }
    }

    /// Runs the node's current step and carries out the policy's decision: what the loop of
    /// [`Engine::advance`] does next.
    async fn run_one(&self, node: &Node, owner: Uuid, start_logged: bool) -> StoreResult<Next> {
        // A look again at a waiting step is not a new start: its start and its reason are in
        // the log already, and a crowd of waiting nodes would add a row per look.
        if node.waiting_for.is_none() && !start_logged {
            store::step_started(&mut *self.conn().await?, node).await?;
        }
        let started = std::time::Instant::now();
        // The lease is held for as long as the step runs; a run that loses it stops its step
        // where it is, so the step never runs on two workers at once.
        let ran = tokio::select! {
            ran = self.run_step_with_chaos(node, owner) => ran,
            lost = self.hold_lease(node.id, owner) => Err(lost),
        };
        let took = started.elapsed();
        let result = match &ran {
            Ok(Outcome::Done(_)) => StepResult::Done,
            Ok(Outcome::NotYet(why)) => StepResult::NotYet(why),
            Err(error) => StepResult::Failed(error),
        };
        let rules = Rules {
            pacing: &self.config.pacing,
            undo_failed: self.config.undo_failed,
        };
        let jitter = rand::rng().random_range(0.0..=1.0);
        let action = policy::decide(&StepFacts::of(node, Utc::now()), result, &rules, jitter);
        let outcome = match &action {
            Action::Advance { .. } => "advanced",
            Action::LookAgain { .. } => "waiting",
            Action::Retry { .. } => "retrying",
            Action::FailAndUndo { .. } | Action::FailAndKeep { .. } => "failed",
        };
        let workflow = node
            .state()
            .workflow()
            .map_or("none", |w| w.status().as_str());
        let committed = match action {
            Action::Advance { to } => {
                let created = match ran {
                    Ok(Outcome::Done(created)) => created,
                    _ => Default::default(),
                };
                let lease = self.config.pacing.lease;
                let committed =
                    store::commit_step(&mut *self.conn().await?, node, owner, to, &created, lease)
                        .await?;
                if committed.is_ok() {
                    tracing::info!(next = %to, "step succeeded");
                }
                committed.map(|now| Next::Run(Box::new(now)))
            }
            Action::LookAgain { after, why } => {
                tracing::debug!(why, "not yet; looking again later");
                store::schedule(
                    &mut *self.conn().await?,
                    node,
                    owner,
                    after,
                    Postponed::Waiting(&why),
                )
                .await?
                .map(|()| Next::Stop)
            }
            Action::Retry { after, error } => {
                tracing::warn!(error = %error, delay_ms = after.as_millis() as u64, "transient failure; retry scheduled");
                store::schedule(
                    &mut *self.conn().await?,
                    node,
                    owner,
                    after,
                    Postponed::Retrying(&error),
                )
                .await?
                .map(|()| Next::Stop)
            }
            // The node goes on at once, to its undo.
            Action::FailAndUndo { error } => {
                tracing::error!(error, unwind = true, "step failed");
                store::fail(&mut *self.conn().await?, node, owner, &error, Failure::Undo)
                    .await?
                    .map(|()| Next::Reread)
            }
            Action::FailAndKeep { error } => {
                tracing::error!(error, unwind = false, "step failed");
                store::fail(&mut *self.conn().await?, node, owner, &error, Failure::Keep)
                    .await?
                    .map(|()| Next::Stop)
            }
        };
        let step = node.state().as_str();
        match committed {
            Ok(next) => {
                crate::metrics::step(workflow, step, outcome, took);
                Ok(next)
            }
            Err(fenced) => {
                crate::metrics::step(workflow, step, "fenced", took);
                tracing::warn!(%fenced, "step result dropped");
                store::release(&mut *self.conn().await?, node.id, owner).await?;
                Ok(Next::Stop)
            }
        }
    }

    /// Renews the node's lease every third of its length while its step runs; returns (and so
    /// stops the step) only when the lease is lost, or cannot be renewed before it lapses.
    async fn hold_lease(&self, node_id: Uuid, owner: Uuid) -> CloudError {
        let lease = self.config.pacing.lease;
        let mut held_until = tokio::time::Instant::now() + lease;
        loop {
            tokio::time::sleep(lease / 3).await;
            let renewed = match self.conn().await {
                Ok(mut conn) => store::renew_lease(&mut conn, node_id, owner, lease).await,
                Err(e) => Err(e),
            };
            match renewed {
                Ok(true) => held_until = tokio::time::Instant::now() + lease,
                Ok(false) => {
                    tracing::warn!(%node_id, "lease lost while the step ran; step stopped");
                    return CloudError::transient("lease", "the node's lease was lost");
                }
                // Our database is away: keep trying while the lease still holds.
                Err(e) if tokio::time::Instant::now() + lease / 3 < held_until => {
                    tracing::warn!(%node_id, error = %e, "could not renew the lease; trying again");
                }
                Err(e) => {
                    tracing::warn!(%node_id, error = %e, "lease about to lapse; step stopped");
                    return CloudError::transient("lease", "the node's lease could not be renewed");
                }
            }
        }
    }

    /// The step, with the test-only faults of `HIVE_CHAOS` applied around its side effect.
    async fn run_step_with_chaos(&self, node: &Node, owner: Uuid) -> CloudResult<Outcome> {
        let Some(aws) = self.clouds.region(&node.region) else {
            // Checked when the lease was taken; never fail a node for a worker's settings.
            return Err(CloudError::transient(
                "worker",
                format!("region {} is not driven by this worker", node.region),
            ));
        };
        let progress = EngineProgress {
            db: &self.db,
            owner,
        };
        let ctx = StepContext {
            clouds: &self.clouds,
            aws,
            config: &self.config,
            progress: &progress,
        };
        let outcome = run_step(&ctx, node).await;
        let step = node.state().as_str();
        match (&self.config.chaos, &outcome) {
            (Some(Chaos::RepeatSteps), Ok(Outcome::Done(first))) => {
                let again = run_step(&ctx, node).await?;
                if again != Outcome::Done(first.clone()) {
                    return Err(CloudError::permanent(
                        "chaos",
                        format!("{step} is not idempotent: {first:?} then {again:?}"),
                    ));
                }
                outcome
            }
            (Some(Chaos::FailAfter(at)), Ok(Outcome::Done(_))) if at == step => Err(
                CloudError::permanent("chaos", format!("injected failure after {step}")),
            ),
            (Some(Chaos::CrashAfter(at)), Ok(Outcome::Done(_))) if at == step => {
                tracing::error!(
                    "chaos: crashing after the side effect of {step}, before its commit"
                );
                std::process::abort();
            }
            _ => outcome,
        }
    }
}

/// A step's writes before its side effect, through the store, fenced by this run's lease.
struct EngineProgress<'a> {
    db: &'a Connections,
    owner: Uuid,
}

impl EngineProgress<'_> {
    async fn record(&self, node: &Node, what: store::Progress<'_>) -> CloudResult<()> {
        let mut conn = self
            .db
            .get()
            .await
            .map_err(|e| CloudError::transient("store", e.to_string()))?;
        match store::record_progress(&mut conn, node, self.owner, what).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(CloudError::transient(
                "lease",
                "the node moved on under this run; its step stops here",
            )),
            Err(e) => Err(CloudError::transient("store", e.to_string())),
        }
    }
}

impl Progress for EngineProgress<'_> {
    fn launch_attempt<'a>(&'a self, node: &'a Node, token: &'a str) -> ProgressFuture<'a> {
        Box::pin(self.record(node, store::Progress::LaunchAttempt(token)))
    }

    fn route53_change<'a>(&'a self, node: &'a Node, change_id: &'a str) -> ProgressFuture<'a> {
        Box::pin(self.record(node, store::Progress::Route53Change(change_id)))
    }
}
