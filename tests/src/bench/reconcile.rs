//! Scale: one reconcile pass over ready nodes that have drifted nowhere: its time, and its calls
//! per provider (counted by the Cloudflare stand-in and the AWS proxy). Ceiling: the pages a
//! pass must read at the providers' largest page sizes, plus the budget the issue allows.

use std::time::Instant;

use super::{Figure, Size};
use crate::stack::Stack;

const SCENARIO: &str = "reconcile";

pub async fn run(stack: &Stack, size: Size) -> anyhow::Result<Vec<Figure>> {
    let count = size.count(10_000, 500);
    crate::seed::ready_nodes(stack, count).await?;
    let (cloudflare_before, _) = stack.standin.call_counts();
    let ec2_before = stack.aws_proxy.ec2_calls();
    let started = Instant::now();
    let out = stack.hivectl(&["reconcile", "--grace-secs", "0", "--yes", "--json"])?;
    let took = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        out.status.success(),
        "hivectl reconcile: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let findings: usize = ["removed", "reprovisioned", "repaired"]
        .iter()
        .map(|k| report[k].as_array().map(Vec::len).unwrap_or(0))
        .sum();
    anyhow::ensure!(findings == 0, "a pass over seeded nodes found {report}");
    let cloudflare = (stack.standin.call_counts().0 - cloudflare_before) as f64;
    let ec2 = f64::from(stack.aws_proxy.ec2_calls() - ec2_before);
    Ok(vec![
        Figure::new(
            SCENARIO,
            format!("one pass over {count} ready nodes"),
            took,
            "s",
        ),
        Figure::new(SCENARIO, "Cloudflare calls", cloudflare, "calls")
            .under((count / 100 + 10) as f64, "nodes/100 + 10"),
        Figure::new(SCENARIO, "EC2 calls", ec2, "calls")
            .under((count / 1000 + 10) as f64, "nodes/1000 + 10"),
    ])
}
