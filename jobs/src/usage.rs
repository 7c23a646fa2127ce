//! What a customer used: node-hours, read off the nodes' logs.
//!
//! The rule: a node counts for the time it is `ready` (serving). Provisioning, suspended or
//! stopped time, restarts and resizes (the instance is down or not yet serving) and teardown
//! do not count.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, Utc};
use uuid::Uuid;

use crate::model::NodeState;

/// Time each node was `ready` within `[from, to)`, from its moves (`from -> to` details, in
/// order per node). A node still ready counts until `to`.
pub fn ready_time(
    moves: &[(Uuid, DateTime<Utc>, String)],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> BTreeMap<Uuid, TimeDelta> {
    let ready = NodeState::Ready.as_str();
    let mut used: BTreeMap<Uuid, TimeDelta> = BTreeMap::new();
    let mut ready_since: BTreeMap<Uuid, DateTime<Utc>> = BTreeMap::new();
    let mut add = |node: Uuid, start: DateTime<Utc>, end: DateTime<Utc>| {
        let (start, end) = (start.max(from), end.min(to));
        let total = used.entry(node).or_insert_with(TimeDelta::zero);
        if end > start {
            *total += end - start;
        }
    };
    for (node, at, detail) in moves {
        let Some((was, now)) = detail.split_once(" -> ") else {
            continue;
        };
        if was == ready {
            if let Some(since) = ready_since.remove(node) {
                add(*node, since, *at);
            }
        }
        if now == ready {
            ready_since.insert(*node, *at);
        }
    }
    for (node, since) in ready_since {
        add(node, since, to);
    }
    used
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ready_time_counts() {
        let node = Uuid::new_v4();
        let t = |s: i64| DateTime::from_timestamp(1_000_000 + s, 0).unwrap();
        let moves: Vec<(Uuid, DateTime<Utc>, String)> = [
            (0, "waiting_for_tunnel -> ready"),
            (100, "ready -> stopping_instance"),
            (110, "waiting_for_stop -> suspended"),
            (400, "suspended -> starting_instance"),
            (420, "waiting_for_reconnect -> ready"),
            (500, "ready -> rebooting_instance"),
            (530, "waiting_after_reboot -> ready"),
        ]
        .into_iter()
        .map(|(s, d)| (node, t(s), d.to_string()))
        .collect();
        // Ready 0-100, 420-500, 530-600.
        let used = ready_time(&moves, t(0), t(600));
        assert_eq!(used[&node], TimeDelta::seconds(100 + 80 + 70));
        // A window cuts the intervals.
        let used = ready_time(&moves, t(50), t(450));
        assert_eq!(used[&node], TimeDelta::seconds(50 + 30));
        // Before the node was ready: nothing.
        assert_eq!(ready_time(&moves, t(-100), t(0))[&node], TimeDelta::zero());
    }
}
