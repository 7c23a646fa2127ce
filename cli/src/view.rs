//! What hivectl prints: one shape per thing, shown as a table for people (fitted to the
//! terminal, plain when piped, no colour under `NO_COLOR`) or as JSON (`--json`, a stable shape
//! for scripts: the same fields as the table, and more).

use std::io::IsTerminal;

use chrono::{DateTime, Utc};
use comfy_table::presets::{NOTHING, UTF8_FULL_CONDENSED};
use comfy_table::{Cell, Color, ContentArrangement, Table};
use hive_jobs::conditions::{self, Condition};
use hive_jobs::model::{Node, NodeEvent, NodeStatus};
use serde::Serialize;
use uuid::Uuid;

/// A node, as `nodes --json` and `node --json` give it.
#[derive(Debug, Serialize)]
pub struct NodeJson {
    pub id: Uuid,
    pub user: String,
    pub subscription_id: Uuid,
    pub region: String,
    pub state: String,
    pub status: NodeStatus,
    pub desired: String,
    pub instance_type: String,
    pub volume_gb: i32,
    pub applied_instance_type: Option<String>,
    pub applied_volume_gb: Option<i32>,
    /// Where the instance runs (`subnet-... (zone)`).
    pub placement: Option<String>,
    /// Runs as `fallback_type` in place of `fallback_for`, for want of capacity.
    pub fallback_type: Option<String>,
    pub fallback_for: Option<String>,
    pub hostname: String,
    pub generation: i32,
    pub instance_id: Option<String>,
    pub tunnel_id: Option<String>,
    pub secret_arn: Option<String>,
    pub dns_record_id: Option<String>,
    pub failed_step: Option<String>,
    pub error: Option<String>,
    pub waiting_for: Option<String>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<&Node> for NodeJson {
    fn from(n: &Node) -> Self {
        NodeJson {
            id: n.id,
            user: n.user_id.clone(),
            subscription_id: n.subscription_id,
            region: n.region.clone(),
            state: n.state().to_string(),
            status: n.status(),
            desired: n.desired.clone(),
            instance_type: n.instance_type.clone(),
            volume_gb: n.volume_gb,
            applied_instance_type: n.applied_instance_type.clone(),
            applied_volume_gb: n.applied_volume_gb,
            placement: n.placement.clone(),
            fallback_type: n.fallback_type.clone(),
            fallback_for: n.fallback_for.clone(),
            hostname: n.hostname.clone(),
            generation: n.generation,
            instance_id: n.instance_id.clone(),
            tunnel_id: n.tunnel_id.clone(),
            secret_arn: n.secret_arn.clone(),
            dns_record_id: n.dns_record_id.clone(),
            failed_step: n.failed_step.clone(),
            error: n.error.clone(),
            waiting_for: n.waiting_for.clone(),
            last_error: n.last_error.clone(),
            created_at: n.created_at,
            updated_at: n.updated_at,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct EventJson {
    pub at: DateTime<Utc>,
    pub generation: i32,
    pub step: String,
    pub kind: String,
    pub detail: Option<String>,
}

impl From<&NodeEvent> for EventJson {
    fn from(e: &NodeEvent) -> Self {
        EventJson {
            at: e.at,
            generation: e.generation,
            step: e.step.clone(),
            kind: e.kind.clone(),
            detail: e.detail.clone(),
        }
    }
}

/// `node ID --json`: the node, its conditions and its whole log.
#[derive(Debug, Serialize)]
pub struct NodeDetailJson {
    pub node: NodeJson,
    pub conditions: Vec<Condition>,
    pub events: Vec<EventJson>,
}

impl NodeDetailJson {
    pub fn new(node: &Node, events: &[NodeEvent]) -> Self {
        let moves: Vec<(DateTime<Utc>, String)> = events
            .iter()
            .filter(|e| e.kind == "transition")
            .map(|e| (e.at, e.detail.clone().unwrap_or_default()))
            .collect();
        let message = node
            .error
            .as_deref()
            .or(node.waiting_for.as_deref())
            .or(node.last_error.as_deref());
        NodeDetailJson {
            node: node.into(),
            conditions: conditions::conditions(node.state(), message, node.created_at, &moves),
            events: events.iter().map(EventJson::from).collect(),
        }
    }
}

/// How the console shows tables.
pub struct Style {
    terminal: bool,
    color: bool,
}

impl Style {
    pub fn of_stdout() -> Self {
        let terminal = std::io::stdout().is_terminal();
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Style {
            terminal,
            color: terminal && !no_color,
        }
    }

    pub fn table(&self, header: &[&str]) -> Table {
        let mut table = Table::new();
        if self.terminal {
            table
                .load_preset(UTF8_FULL_CONDENSED)
                .set_content_arrangement(ContentArrangement::Dynamic);
        } else {
            // Piped: columns padded with spaces, no borders, never wrapped.
            table
                .load_preset(NOTHING)
                .set_content_arrangement(ContentArrangement::Disabled);
        }
        table.set_header(header.iter().map(Cell::new));
        table
    }

    /// A status, red when it failed (and colour is on).
    pub fn status(&self, status: NodeStatus) -> Cell {
        let cell = Cell::new(status_name(status));
        match (self.color, status) {
            (true, NodeStatus::Failed) => cell.fg(Color::Red),
            (true, NodeStatus::Ready) => cell.fg(Color::Green),
            _ => cell,
        }
    }
}

pub fn status_name(status: NodeStatus) -> String {
    serde_json::to_value(status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

pub fn nodes_table(style: &Style, nodes: &[Node]) -> Table {
    let mut table = style.table(&[
        "node", "user", "status", "state", "region", "type", "instance", "updated", "error",
    ]);
    for n in nodes {
        table.add_row(vec![
            Cell::new(n.id),
            Cell::new(&n.user_id),
            style.status(n.status()),
            Cell::new(n.state()),
            Cell::new(&n.region),
            Cell::new(&n.instance_type),
            Cell::new(n.instance_id.as_deref().unwrap_or("-")),
            Cell::new(n.updated_at.format("%Y-%m-%d %H:%M:%S")),
            Cell::new(n.error.as_deref().unwrap_or("")),
        ]);
    }
    table
}

/// `node ID`: what it is, what it should be, its conditions, then its log (as kubectl's
/// describe ends with events).
pub fn node_detail(style: &Style, detail: &NodeDetailJson) -> String {
    let n = &detail.node;
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let mut fields = style.table(&["field", "value"]);
    let rows: Vec<(&str, String)> = vec![
        ("node", n.id.to_string()),
        ("user", n.user.clone()),
        ("subscription", n.subscription_id.to_string()),
        ("status", status_name(n.status)),
        ("state", n.state.clone()),
        ("desired", n.desired.clone()),
        ("generation", n.generation.to_string()),
        ("hostname", n.hostname.clone()),
        ("region", n.region.clone()),
        (
            "size (wanted)",
            format!("{} {} GiB", n.instance_type, n.volume_gb),
        ),
        (
            "size (applied)",
            format!(
                "{} {}",
                opt(&n.applied_instance_type),
                n.applied_volume_gb
                    .map(|v| format!("{v} GiB"))
                    .unwrap_or_else(|| "-".into())
            ),
        ),
        ("placement", opt(&n.placement)),
        (
            "capacity fallback",
            match (&n.fallback_type, &n.fallback_for) {
                (Some(runs_as), Some(wanted)) => format!("{runs_as} in place of {wanted}"),
                _ => "-".into(),
            },
        ),
        ("tunnel", opt(&n.tunnel_id)),
        ("secret", opt(&n.secret_arn)),
        ("instance", opt(&n.instance_id)),
        ("dns record", opt(&n.dns_record_id)),
        ("failed step", opt(&n.failed_step)),
        ("waiting for", opt(&n.waiting_for)),
        ("last error", opt(&n.last_error)),
        ("error", opt(&n.error)),
    ];
    for (k, v) in rows {
        fields.add_row(vec![k.to_string(), v]);
    }
    let mut conditions = style.table(&["condition", "status", "reason", "since"]);
    for c in &detail.conditions {
        conditions.add_row(vec![
            c.kind.to_string(),
            format!("{:?}", c.status).to_lowercase(),
            c.reason.clone(),
            c.last_transition_time
                .format("%Y-%m-%d %H:%M:%S")
                .to_string(),
        ]);
    }
    let mut events = style.table(&["at", "gen", "step", "kind", "detail"]);
    for e in &detail.events {
        events.add_row(vec![
            e.at.format("%Y-%m-%d %H:%M:%S%.3f").to_string(),
            e.generation.to_string(),
            e.step.clone(),
            e.kind.clone(),
            e.detail.clone().unwrap_or_default(),
        ]);
    }
    format!("{fields}\n\nconditions:\n{conditions}\n\nevents:\n{events}")
}
