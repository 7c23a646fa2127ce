//! AWS's timing, as its documentation describes it, for the proxy in front of moto (which
//! answers everything at once and in sync).
//!
//! - EC2's reads are eventually consistent: for a while after `RunInstances`, a read by id
//!   answers `InvalidInstanceID.NotFound`, a filtered read does not list the instance, and an
//!   action naming it fails the same way ("Eventual consistency in the Amazon EC2 API").
//! - A launched or started instance is `pending` before it is `running`; a stopped one is
//!   `stopping` before it is `stopped`. EC2 refuses to stop a `pending` instance and to change
//!   the type of one that is not `stopped` (`IncorrectInstanceState`).
//! - A volume being modified is `modifying`, then `optimizing`, then `completed`; its new size
//!   shows only once it is `optimizing`, and EC2 refuses another modification until it is
//!   done (`IncorrectModificationState`).
//! - Route 53 answers every change `PENDING` ("the initial status of all change batch
//!   requests") and reports `INSYNC` only through `GetChange`, some time later.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

/// How slow the clouds are. A faster clock than the real one is fine; none of it is zero in
/// the tests' world.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a new instance is unknown to EC2's reads and actions.
    pub describe_lag: Duration,
    /// How long a launched or started instance reads `pending`.
    pub pending_for: Duration,
    /// How long a stopped instance reads `stopping`.
    pub stopping_for: Duration,
    /// How long a Route 53 change reads `PENDING`.
    pub route53_sync: Duration,
    /// How long a volume modification is `modifying` (the old size still shows), then
    /// `optimizing`.
    pub volume_modifying: Duration,
    pub volume_optimizing: Duration,
}

impl Timing {
    /// The tests' world: every delay there, on a faster clock than AWS's.
    pub fn strict() -> Self {
        Self {
            describe_lag: Duration::from_millis(2_000),
            pending_for: Duration::from_millis(1_500),
            stopping_for: Duration::from_millis(1_000),
            route53_sync: Duration::from_millis(2_000),
            volume_modifying: Duration::from_millis(1_000),
            volume_optimizing: Duration::from_millis(2_000),
        }
    }
}

/// What the proxy remembers to answer as AWS would.
#[derive(Debug, Default)]
pub struct Clock {
    launched: HashMap<String, Instant>,
    started: HashMap<String, Instant>,
    stopped: HashMap<String, Instant>,
    /// Route 53 changes by id: when they were made.
    changes: HashMap<String, Instant>,
    /// Volume modifications by volume: when the last began, and the size before it.
    modified: HashMap<String, (Instant, String)>,
    next_change: u64,
}

impl Clock {
    /// Instances EC2 does not know yet.
    pub fn unknown(&self, timing: &Timing, now: Instant) -> HashSet<String> {
        within(&self.launched, timing.describe_lag, now)
    }

    /// Instances that read `pending` (launched or started a moment ago).
    pub fn pending(&self, timing: &Timing, now: Instant) -> HashSet<String> {
        let mut ids = within(&self.launched, timing.pending_for, now);
        ids.extend(within(&self.started, timing.pending_for, now));
        ids
    }

    /// Instances stopped a moment ago, which read `stopping`.
    pub fn stopping(&self, timing: &Timing, now: Instant) -> HashSet<String> {
        within(&self.stopped, timing.stopping_for, now)
    }

    pub fn launched(&mut self, ids: impl IntoIterator<Item = String>, now: Instant) {
        for id in ids {
            self.launched.insert(id, now);
        }
    }

    pub fn started(&mut self, ids: impl IntoIterator<Item = String>, now: Instant) {
        for id in ids {
            self.stopped.remove(&id);
            self.started.insert(id, now);
        }
    }

    pub fn stopped(&mut self, ids: impl IntoIterator<Item = String>, now: Instant) {
        for id in ids {
            self.started.remove(&id);
            self.stopped.insert(id, now);
        }
    }

    pub fn volume_modified(&mut self, volume_id: String, original_size: String, now: Instant) {
        self.modified.insert(volume_id, (now, original_size));
    }

    /// A volume's modification state where it is not yet `completed`, with its size before.
    pub fn modification(
        &self,
        volume_id: &str,
        timing: &Timing,
        now: Instant,
    ) -> Option<(&'static str, &str)> {
        let (began, original) = self.modified.get(volume_id)?;
        let since = now.duration_since(*began);
        if since < timing.volume_modifying {
            Some(("modifying", original))
        } else if since < timing.volume_modifying + timing.volume_optimizing {
            Some(("optimizing", original))
        } else {
            None
        }
    }

    /// Volumes whose modification is not yet `completed`, with the state and the size before.
    pub fn modifications(
        &self,
        timing: &Timing,
        now: Instant,
    ) -> Vec<(String, &'static str, String)> {
        self.modified
            .keys()
            .filter_map(|id| {
                self.modification(id, timing, now)
                    .map(|(state, size)| (id.clone(), state, size.to_string()))
            })
            .collect()
    }

    /// A new change, `PENDING` from now: its id.
    pub fn change(&mut self, now: Instant) -> String {
        self.next_change += 1;
        let id = format!("C{:012}HIVE", self.next_change);
        self.changes.insert(id.clone(), now);
        id
    }

    /// A change's status: `None` for an id Route 53 never gave.
    pub fn change_status(&self, id: &str, timing: &Timing, now: Instant) -> Option<&'static str> {
        let id = id.trim_start_matches("/change/");
        let made = self.changes.get(id)?;
        Some(if now.duration_since(*made) < timing.route53_sync {
            "PENDING"
        } else {
            "INSYNC"
        })
    }
}

fn within(at: &HashMap<String, Instant>, window: Duration, now: Instant) -> HashSet<String> {
    at.iter()
        .filter(|(_, t)| now.duration_since(**t) < window)
        .map(|(id, _)| id.clone())
        .collect()
}

/// The instance ids an EC2 request names (`InstanceId.N`, `ResourceId.N` of an instance,
/// `InstanceId`).
pub fn named_instances(form: &BTreeMap<String, String>) -> Vec<String> {
    form.iter()
        .filter(|(k, v)| {
            (*k == "InstanceId" || k.starts_with("InstanceId.") || k.starts_with("ResourceId."))
                && v.starts_with("i-")
        })
        .map(|(_, v)| v.clone())
        .collect()
}

/// A `DescribeInstances` answer without the reservations holding any of `ids`.
pub fn without_instances(answer: &str, ids: &HashSet<String>) -> String {
    const SET: &str = "<reservationSet>";
    let Some(open) = answer.find(SET) else {
        return answer.to_string();
    };
    let body_start = open + SET.len();
    let Some(close) = answer.rfind("</reservationSet>") else {
        return answer.to_string();
    };
    let mut out = String::with_capacity(answer.len());
    out.push_str(&answer[..body_start]);
    for (item, kept) in top_items(&answer[body_start..close]) {
        if !kept {
            out.push_str(item);
            continue;
        }
        let holds = ids
            .iter()
            .any(|id| item.contains(&format!("<instanceId>{id}</instanceId>")));
        if !holds {
            out.push_str(item);
        }
    }
    out.push_str(&answer[close..]);
    out
}

/// The text of a list's body cut into its top-level `<item>` elements (`true`) and what lies
/// between them (`false`).
fn top_items(body: &str) -> Vec<(&str, bool)> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0usize;
    let mut i = 0usize;
    while i < body.len() {
        let rest = &body[i..];
        if rest.starts_with("<item>") {
            if depth == 0 {
                if start < i {
                    parts.push((&body[start..i], false));
                }
                start = i;
            }
            depth += 1;
            i += "<item>".len();
        } else if rest.starts_with("</item>") {
            depth = depth.saturating_sub(1);
            i += "</item>".len();
            if depth == 0 {
                parts.push((&body[start..i], true));
                start = i;
            }
        } else {
            i += rest.chars().next().map_or(1, char::len_utf8);
        }
    }
    if start < body.len() {
        parts.push((&body[start..], false));
    }
    parts
}

/// A `DescribeInstances` answer with the state of each of `ids` (every instance when `None`)
/// set to `name` (`code`), where its state now is `from` (any state when `None`).
pub fn with_state(
    answer: &str,
    ids: Option<&HashSet<String>>,
    from: Option<&str>,
    code: u32,
    name: &str,
) -> String {
    const OPEN: &str = "<instanceState>";
    const CLOSE: &str = "</instanceState>";
    let mut out = String::with_capacity(answer.len());
    let mut rest = answer;
    while let Some(at) = rest.find("<instanceId>") {
        let (before, from_id) = rest.split_at(at);
        out.push_str(before);
        let id_end = from_id.find("</instanceId>").unwrap_or(from_id.len());
        let id = &from_id["<instanceId>".len().min(id_end)..id_end];
        match (
            ids.is_none_or(|ids| ids.contains(id)),
            from_id.find(OPEN),
            from_id.find(CLOSE),
            from_id[1..].find("<instanceId>").map(|n| n + 1),
        ) {
            // The state within this instance's own item (before the next instance's id).
            (true, Some(open), Some(close), next)
                if open < close && next.is_none_or(|n| close < n) =>
            {
                let block = &from_id[open..close + CLOSE.len()];
                out.push_str(&from_id[..open]);
                if from.is_none_or(|f| block.contains(&format!("<name>{f}</name>"))) {
                    out.push_str(&format!(
                        "{OPEN}<code>{code}</code><name>{name}</name>{CLOSE}"
                    ));
                } else {
                    out.push_str(block);
                }
                rest = &from_id[close + CLOSE.len()..];
            }
            _ => {
                let skip = "<instanceId>".len().min(from_id.len());
                out.push_str(&from_id[..skip]);
                rest = &from_id[skip..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// An answer with the text of the `field` element that follows `<volumeId>{volume}` (before
/// the next volume) replaced by `value`: the first one, or in the last item naming the volume.
pub fn with_volume_field(
    answer: &str,
    volume: &str,
    field: &str,
    value: &str,
    last: bool,
) -> String {
    let marker = format!("<volumeId>{volume}</volumeId>");
    let found = if last {
        answer.rfind(&marker)
    } else {
        answer.find(&marker)
    };
    let Some(at) = found else {
        return answer.to_string();
    };
    let (open, close) = (format!("<{field}>"), format!("</{field}>"));
    let rest = &answer[at + marker.len()..];
    let next_volume = rest.find("<volumeId>").unwrap_or(rest.len());
    match (rest.find(&open), rest.find(&close)) {
        (Some(o), Some(c)) if o < c && c < next_volume => {
            let start = at + marker.len() + o + open.len();
            let end = at + marker.len() + c;
            format!("{}{value}{}", &answer[..start], &answer[end..])
        }
        _ => answer.to_string(),
    }
}

/// A `ChangeResourceRecordSets` answer that names `id` and says `PENDING`, as AWS's does.
pub fn pending_change(answer: &str, id: &str) -> String {
    let mut out = answer.to_string();
    if let (Some(open), Some(close)) = (out.find("<Id>"), out.find("</Id>")) {
        if open < close {
            out.replace_range(open + "<Id>".len()..close, &format!("/change/{id}"));
        }
    }
    out.replace("<Status>INSYNC</Status>", "<Status>PENDING</Status>")
}

/// Route 53's `GetChange` answer.
pub fn get_change_answer(id: &str, status: &str) -> String {
    let id = id.trim_start_matches("/change/");
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<GetChangeResponse xmlns=\"https://route53.amazonaws.com/doc/2013-04-01/\"><ChangeInfo><Id>/change/{id}</Id><Status>{status}</Status><SubmittedAt>2026-01-01T00:00:00.000Z</SubmittedAt></ChangeInfo></GetChangeResponse>"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = "<DescribeInstancesResponse><reservationSet>\
<item><reservationId>r-1</reservationId><instancesSet><item><instanceId>i-1</instanceId><tagSet><item><key>a</key></item></tagSet><instanceState><code>16</code><name>running</name></instanceState></item></instancesSet></item>\
<item><reservationId>r-2</reservationId><instancesSet><item><instanceId>i-2</instanceId><instanceState><code>80</code><name>stopped</name></instanceState></item></instancesSet></item>\
</reservationSet></DescribeInstancesResponse>";

    #[test]
    fn unknown_instances_are_left_out_of_listings() {
        let ids: HashSet<String> = ["i-1".to_string()].into();
        let out = without_instances(TWO, &ids);
        assert!(!out.contains("i-1"), "{out}");
        assert!(out.contains("<instanceId>i-2</instanceId>"), "{out}");
        assert!(out.ends_with("</reservationSet></DescribeInstancesResponse>"));
        assert_eq!(without_instances(TWO, &HashSet::new()), TWO);
    }

    #[test]
    fn states_change_only_for_the_named_instances_in_the_named_state() {
        let ids: HashSet<String> = ["i-1".to_string(), "i-2".to_string()].into();
        let out = with_state(TWO, Some(&ids), Some("stopped"), 64, "stopping");
        assert!(
            out.contains(
                "<instanceId>i-2</instanceId><instanceState><code>64</code><name>stopping</name>"
            ),
            "{out}"
        );
        assert!(out.contains("<name>running</name>"), "{out}");
        let out = with_state(TWO, Some(&["i-1".to_string()].into()), None, 0, "pending");
        assert!(out.contains("<code>0</code><name>pending</name>"), "{out}");
        assert!(out.contains("<name>stopped</name>"), "{out}");
        let out = with_state(TWO, None, Some("stopped"), 64, "stopping");
        assert!(
            out.contains(
                "<instanceId>i-2</instanceId><instanceState><code>64</code><name>stopping</name>"
            ),
            "{out}"
        );
        assert!(out.contains("<name>running</name>"), "{out}");
    }

    #[test]
    fn a_volume_shows_its_old_size_while_modifying_and_its_state_until_done() {
        let timing = Timing::strict();
        let mut clock = Clock::default();
        let t0 = Instant::now();
        clock.volume_modified("vol-1".into(), "8".into(), t0);
        assert_eq!(
            clock.modification("vol-1", &timing, t0),
            Some(("modifying", "8"))
        );
        let optimizing = t0 + timing.volume_modifying;
        assert_eq!(
            clock.modification("vol-1", &timing, optimizing),
            Some(("optimizing", "8"))
        );
        let done = optimizing + timing.volume_optimizing;
        assert_eq!(clock.modification("vol-1", &timing, done), None);
        let volumes = "<volumeSet><item><volumeId>vol-0</volumeId><size>5</size></item>\
<item><volumeId>vol-1</volumeId><size>20</size></item></volumeSet>";
        let out = with_volume_field(volumes, "vol-1", "size", "8", false);
        assert!(
            out.contains("<volumeId>vol-1</volumeId><size>8</size>"),
            "{out}"
        );
        assert!(
            out.contains("<volumeId>vol-0</volumeId><size>5</size>"),
            "{out}"
        );
        let mods = "<s><item><volumeId>vol-1</volumeId><modificationState>completed</modificationState></item>\
<item><volumeId>vol-1</volumeId><modificationState>completed</modificationState></item></s>";
        let out = with_volume_field(mods, "vol-1", "modificationState", "optimizing", true);
        assert!(
            out.ends_with("<modificationState>optimizing</modificationState></item></s>"),
            "{out}"
        );
        assert_eq!(out.matches("completed").count(), 1, "{out}");
    }

    #[test]
    fn route53_changes_are_pending_until_their_time() {
        let timing = Timing::strict();
        let mut clock = Clock::default();
        let t0 = Instant::now();
        let id = clock.change(t0);
        assert_eq!(clock.change_status(&id, &timing, t0), Some("PENDING"));
        assert_eq!(
            clock.change_status(&format!("/change/{id}"), &timing, t0 + timing.route53_sync),
            Some("INSYNC")
        );
        assert_eq!(clock.change_status("C0", &timing, t0), None);
        let answer = "<ChangeResourceRecordSetsResponse><ChangeInfo><Id>/change/C2682N5HXP0BZ4</Id><Status>INSYNC</Status></ChangeInfo></ChangeResourceRecordSetsResponse>";
        let out = pending_change(answer, &id);
        assert!(
            out.contains(&format!("<Id>/change/{id}</Id><Status>PENDING</Status>")),
            "{out}"
        );
    }
}
