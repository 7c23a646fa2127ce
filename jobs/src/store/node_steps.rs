//! The worker's fenced commits of a node's steps, side by side: each names the state, generation
//! and lease it read, so a worker that comes back late cannot overwrite a newer result.

use std::time::Duration;

use chrono::Utc;
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use uuid::Uuid;

use crate::model::{Created, Desired, EventKind, Node, NodeState, TeardownReason, Workflow};

use super::{insert_event, queue, resting_states, StoreResult, NODE_COLUMNS};

/// What taking a node's lease found.
pub enum Lease {
    /// This run holds the node until it commits, schedules, fails or releases it.
    Held(Box<Node>),
    /// Another run holds it until the given time.
    HeldElsewhere { until: Duration },
    /// No such node.
    Gone,
}

/// Takes the node's lease for `owner`, unless a live lease of another run holds it.
pub async fn acquire(
    conn: &mut PgConnection,
    id: Uuid,
    owner: Uuid,
    lease: Duration,
) -> StoreResult<Lease> {
    let sql = format!(
        "UPDATE nodes SET lease_owner = $2, lease_expires_at = now() + $3 \
         WHERE id = $1 AND (lease_owner IS NULL OR lease_owner = $2 OR lease_expires_at < now()) \
         RETURNING {NODE_COLUMNS}"
    );
    if let Some(node) = sqlx::query_as::<_, Node>(AssertSqlSafe(sql))
        .bind(id)
        .bind(owner)
        .bind(lease)
        .fetch_optional(&mut *conn)
        .await?
    {
        return Ok(Lease::Held(Box::new(node)));
    }
    let remaining: Option<(Option<f64>,)> = sqlx::query_as(
        "SELECT EXTRACT(EPOCH FROM (lease_expires_at - now()))::float8 FROM nodes WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(match remaining {
        None => Lease::Gone,
        Some((secs,)) => Lease::HeldElsewhere {
            until: Duration::from_secs_f64(secs.unwrap_or(0.0).max(0.0)),
        },
    })
}

/// Why a fenced write changed nothing: the node moved on under another run.
#[derive(Debug, thiserror::Error)]
#[error("node {0} changed under this run; its result is dropped")]
pub struct Fenced(pub Uuid);

/// Moves the node from the state it was read in to `to`, with what the step created, and
/// hands back the node as it now is, its lease renewed for `lease` and (when `to` has a step)
/// the start of that step logged: the engine runs the next step from it, in one round trip
/// per step instead of three (take the lease, log the start, commit).
pub async fn commit_step(
    conn: &mut PgConnection,
    node: &Node,
    owner: Uuid,
    to: NodeState,
    created: &Created,
    lease: Duration,
) -> StoreResult<Result<Node, Fenced>> {
    // Torn down: nothing of these ids exists any more.
    let torn_down =
        to == NodeState::Terminated || (to == NodeState::Failed && node.state().is_teardown());
    // One statement, so one round trip and its own transaction: the move (the guard's trigger
    // logs the transition), the step's success and the next step's start. Fenced, the update
    // matches no row and so nothing is logged. The events are numbered in this order.
    let sql = format!(
        "WITH moved AS ( \
             UPDATE nodes SET state = $5, \
             tunnel_id = CASE WHEN $18 THEN NULL ELSE COALESCE($6, tunnel_id) END, \
             secret_arn = CASE WHEN $18 THEN NULL ELSE COALESCE($7, secret_arn) END, \
             instance_id = CASE WHEN $18 THEN NULL ELSE COALESCE($8, instance_id) END, \
             dns_record_id = CASE WHEN $18 THEN NULL ELSE COALESCE($9, dns_record_id) END, \
             instance_launched_at = CASE WHEN $18 THEN NULL \
                 WHEN $8::text IS NOT NULL AND $8 IS DISTINCT FROM instance_id THEN now() \
                 ELSE instance_launched_at END, \
             route53_change_id = CASE WHEN $18 OR $5 = $23 THEN NULL \
                 ELSE route53_change_id END, \
             applied_instance_type = CASE WHEN $18 THEN NULL \
                 ELSE COALESCE($10, applied_instance_type) END, \
             applied_volume_gb = CASE WHEN $18 THEN NULL \
                 ELSE COALESCE($11, applied_volume_gb) END, \
             restarts_done = COALESCE($12, restarts_done), \
             placement = CASE WHEN $18 THEN NULL ELSE COALESCE($14, placement) END, \
             fallback_type = CASE WHEN $18 THEN NULL WHEN $15::text IS NULL THEN fallback_type \
                 ELSE $15 END, \
             fallback_for = CASE WHEN $18 THEN NULL WHEN $15::text IS NULL THEN fallback_for \
                 ELSE $16 END, \
             attempt = 0, step_started_at = now(), next_run_at = NULL, updated_at = now(), \
             waiting_for = NULL, last_error = NULL, lease_expires_at = now() + $17, \
             error = CASE WHEN teardown_reason = $13 THEN error END \
             WHERE id = $1 AND state = $2 AND generation = $3 AND lease_owner = $4 \
             RETURNING {NODE_COLUMNS}), \
         logged AS ( \
             INSERT INTO node_events (node_id, generation, step, kind, detail) \
             SELECT moved.id, moved.generation, e.step, e.kind, e.detail \
             FROM moved, (VALUES (1, $2::text, $19::text, $20::text), \
                                 (2, $5::text, $21::text, NULL)) AS e (n, step, kind, detail) \
             WHERE e.n = 1 OR $22 \
             ORDER BY e.n) \
         SELECT * FROM moved"
    );
    let moved = sqlx::query_as::<_, Node>(AssertSqlSafe(sql))
        .bind(node.id)
        .bind(node.state().as_str())
        .bind(node.generation)
        .bind(owner)
        .bind(to.as_str())
        .bind(&created.tunnel_id)
        .bind(&created.secret_arn)
        .bind(&created.instance_id)
        .bind(&created.dns_record_id)
        .bind(&created.applied_instance_type)
        .bind(created.applied_volume_gb)
        .bind(created.restarts_done)
        .bind(TeardownReason::ProvisioningFailed.as_str())
        .bind(&created.placement)
        .bind(created.fallback.as_ref().map(|f| f.0.as_str()))
        .bind(created.fallback.as_ref().map(|f| f.1.as_str()))
        .bind(lease)
        .bind(torn_down)
        .bind(EventKind::Succeeded.as_str())
        .bind(created.note.as_deref())
        .bind(EventKind::Started.as_str())
        .bind(to.has_step())
        // A node entering the Route 53 step waits on a change of its own, never an old one.
        .bind(NodeState::RoutingRoute53.as_str())
        .fetch_optional(&mut *conn)
        .await?;
    Ok(moved.ok_or(Fenced(node.id)))
}

/// Why a step is put off.
#[derive(Debug, Clone, Copy)]
pub enum Postponed<'a> {
    /// Nothing to do yet (kept in `waiting_for`; not an attempt).
    Waiting(&'a str),
    /// A transient failure (kept in `last_error`; an attempt).
    Retrying(&'a str),
}

/// Puts the node's step off until `delay` from now, releases the lease and enqueues the job
/// that will run it then, all in one transaction, so a crash loses no backoff.
pub async fn schedule(
    conn: &mut PgConnection,
    node: &Node,
    owner: Uuid,
    delay: Duration,
    why: Postponed<'_>,
) -> StoreResult<Result<(), Fenced>> {
    let (kind, waiting_for, last_error) = match why {
        Postponed::Waiting(why) => (EventKind::Waiting, Some(why), None),
        Postponed::Retrying(error) => (EventKind::RetryScheduled, None, Some(error)),
    };
    let mut tx = conn.begin().await?;
    let updated = sqlx::query(
        "UPDATE nodes SET attempt = attempt + $8::int, next_run_at = now() + $5, \
         waiting_for = $6, last_error = COALESCE($7, last_error), \
         lease_owner = NULL, lease_expires_at = NULL, updated_at = now() \
         WHERE id = $1 AND state = $2 AND generation = $3 AND lease_owner = $4",
    )
    .bind(node.id)
    .bind(node.state().as_str())
    .bind(node.generation)
    .bind(owner)
    .bind(delay)
    .bind(waiting_for)
    .bind(last_error)
    .bind(i32::from(matches!(why, Postponed::Retrying(_))))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if updated == 0 {
        return Ok(Err(Fenced(node.id)));
    }
    // A node waiting for the same thing as at its last look has nothing new to tell: one
    // event per reason, not one per look (thousands of waiting nodes would fill the table).
    let news = match why {
        Postponed::Waiting(why) => node.waiting_for.as_deref() != Some(why),
        Postponed::Retrying(_) => true,
    };
    if news {
        insert_event(
            &mut *tx,
            node.id,
            node.generation,
            node.state(),
            kind,
            waiting_for.or(last_error),
        )
        .await?;
    }
    let waited = (Utc::now() - node.step_started_at)
        .to_std()
        .unwrap_or_default();
    let priority = super::queue::look_again_priority(waited);
    // The node's region is in hand: no lookup of its row.
    queue::enqueue_in_region(&mut tx, &node.region, &[node.id], delay, priority).await?;
    tx.commit().await?;
    Ok(Ok(()))
}

/// What a permanent failure does to the node (the policy's `FailAndUndo` / `FailAndKeep`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The node goes on to the teardown steps (keeping its lease) and ends `failed` once
    /// everything it created is gone.
    Undo,
    /// The node rests `failed` at this step, everything kept.
    Keep,
}

/// Sets the node `failed` at its current step, with the error an operator will see, undone or
/// kept as `failure` says.
pub async fn fail(
    conn: &mut PgConnection,
    node: &Node,
    owner: Uuid,
    error: &str,
    failure: Failure,
) -> StoreResult<Result<(), Fenced>> {
    let unwind = failure == Failure::Undo;
    let mut tx = conn.begin().await?;
    let sql = if unwind {
        "UPDATE nodes SET state = $6, teardown_reason = $7, \
         failed_step = $2, error = $5, attempt = 0, step_started_at = now(), next_run_at = NULL, \
         waiting_for = NULL, updated_at = now() \
         WHERE id = $1 AND state = $2 AND generation = $3 AND lease_owner = $4"
    } else {
        "UPDATE nodes SET state = $6, failed_step = $2, error = $5, next_run_at = NULL, \
         waiting_for = NULL, lease_owner = NULL, lease_expires_at = NULL, updated_at = now() \
         WHERE id = $1 AND state = $2 AND generation = $3 AND lease_owner = $4"
    };
    let to = if unwind {
        NodeState::Terminating
    } else {
        NodeState::Failed
    };
    let mut query = sqlx::query(sql)
        .bind(node.id)
        .bind(node.state().as_str())
        .bind(node.generation)
        .bind(owner)
        .bind(error)
        .bind(to.as_str());
    if unwind {
        query = query.bind(TeardownReason::ProvisioningFailed.as_str());
    }
    let updated = query.execute(&mut *tx).await?.rows_affected();
    if updated == 0 {
        return Ok(Err(Fenced(node.id)));
    }
    insert_event(
        &mut *tx,
        node.id,
        node.generation,
        node.state(),
        EventKind::Failed,
        Some(error),
    )
    .await?;
    tx.commit().await?;
    Ok(Ok(()))
}

/// Starts `workflow` on a resting node whose intent asks for it (the node keeps its lease and
/// goes on at once), fenced like a step's commit.
pub async fn start_workflow(
    conn: &mut PgConnection,
    node: &Node,
    owner: Uuid,
    workflow: Workflow,
) -> StoreResult<Result<(), Fenced>> {
    let Some(first) = workflow.steps().first() else {
        return Ok(Ok(()));
    };
    let mut tx = conn.begin().await?;
    let updated = sqlx::query(
        "UPDATE nodes SET state = $5, attempt = 0, step_started_at = now(), next_run_at = NULL, \
         waiting_for = NULL, last_error = NULL, updated_at = now() \
         WHERE id = $1 AND state = $2 AND generation = $3 AND lease_owner = $4",
    )
    .bind(node.id)
    .bind(node.state().as_str())
    .bind(node.generation)
    .bind(owner)
    .bind(first.as_str())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if updated == 0 {
        return Ok(Err(Fenced(node.id)));
    }
    insert_event(
        &mut *tx,
        node.id,
        node.generation,
        *first,
        EventKind::WorkflowStarted,
        Some(&format!("{workflow:?}")),
    )
    .await?;
    tx.commit().await?;
    Ok(Ok(()))
}

/// Records that a step began, for the node's log.
pub async fn step_started(conn: &mut PgConnection, node: &Node) -> StoreResult<()> {
    insert_event(
        &mut *conn,
        node.id,
        node.generation,
        node.state(),
        EventKind::Started,
        None,
    )
    .await
}

/// Gives the lease back of a node that rests with nothing to do, and clears its due mark (or
/// moves it to the end of a past-due grace, when the worker must act on its own).
pub async fn rest(conn: &mut PgConnection, id: Uuid, owner: Uuid) -> StoreResult<()> {
    sqlx::query(
        "UPDATE nodes SET lease_owner = NULL, lease_expires_at = NULL, \
         next_run_at = CASE WHEN state <> ALL($3) THEN next_run_at \
           WHEN suspend_at > now() AND desired = $4 THEN suspend_at END \
         WHERE id = $1 AND lease_owner = $2",
    )
    .bind(id)
    .bind(owner)
    .bind(resting_states())
    .bind(Desired::Running.as_str())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Extends the lease of a run whose step is still under way (a budget wait, a slow cloud):
/// `false` when the run no longer holds the node, whose step must then stop before its side
/// effect (another worker may be running it).
pub async fn renew_lease(
    conn: &mut PgConnection,
    id: Uuid,
    owner: Uuid,
    lease: Duration,
) -> StoreResult<bool> {
    let renewed = sqlx::query(
        "UPDATE nodes SET lease_expires_at = now() + $3 \
         WHERE id = $1 AND lease_owner = $2 AND lease_expires_at > now()",
    )
    .bind(id)
    .bind(owner)
    .bind(lease)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(renewed == 1)
}

/// What a step writes down before (or while waiting on) its side effect.
#[derive(Debug, Clone, Copy)]
pub enum Progress<'a> {
    /// The launch attempt about to be sent (its `ClientToken`), and when.
    LaunchAttempt(&'a str),
    /// The Route 53 change made, to wait on.
    Route53Change(&'a str),
}

/// Records a step's progress, fenced like a commit: `false` when the node moved on under this
/// run.
pub async fn record_progress(
    conn: &mut PgConnection,
    node: &Node,
    owner: Uuid,
    what: Progress<'_>,
) -> StoreResult<bool> {
    let (sql, value) = match what {
        Progress::LaunchAttempt(token) => (
            "UPDATE nodes SET launch_token = $5, instance_launched_at = now() \
             WHERE id = $1 AND state = $2 AND generation = $3 AND lease_owner = $4",
            token,
        ),
        Progress::Route53Change(change) => (
            "UPDATE nodes SET route53_change_id = $5 \
             WHERE id = $1 AND state = $2 AND generation = $3 AND lease_owner = $4",
            change,
        ),
    };
    let recorded = sqlx::query(sql)
        .bind(node.id)
        .bind(node.state().as_str())
        .bind(node.generation)
        .bind(owner)
        .bind(value)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    Ok(recorded == 1)
}

/// Gives the lease back (the run ends without having scheduled or failed the node).
pub async fn release(conn: &mut PgConnection, id: Uuid, owner: Uuid) -> StoreResult<()> {
    sqlx::query(
        "UPDATE nodes SET lease_owner = NULL, lease_expires_at = NULL \
         WHERE id = $1 AND lease_owner = $2",
    )
    .bind(id)
    .bind(owner)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A job to look at the node again after `delay`, outside any step (lease held elsewhere).
pub async fn enqueue_later(conn: &mut PgConnection, id: Uuid, delay: Duration) -> StoreResult<()> {
    let mut tx = conn.begin().await?;
    queue::enqueue(&mut tx, &[id], delay).await?;
    tx.commit().await?;
    Ok(())
}
