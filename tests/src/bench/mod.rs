//! The benchmarks of `hive-bench`: each scenario runs against the local stack (a private
//! Postgres cluster, moto, the stand-ins, and whichever build of hive-api and hive-worker sits
//! beside the running binary) and reports its figures beside a ceiling measured in the same run
//! on the same Postgres, so that the ratio, not the raw figure, is what a change is judged by.

pub mod dispatch;
pub mod ingest;
pub mod provisioning;
pub mod reads;
pub mod reconcile;
pub mod statements;
pub mod waiting;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

/// How long and how big a run is: the full figures, or a second a scenario so that CI keeps
/// the command working.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    Full,
    Short,
}

/// How long one slice of a throughput scenario lasts: a second (slices of two seconds were no
/// steadier, and pair the load with its ceiling less closely).
pub const SLICE: Duration = Duration::from_secs(1);

impl Size {
    /// A throughput scenario alternates slices of its load with slices of its ceiling, so that
    /// both see the same machine: on a shared VM the cores' speed moves by half within a
    /// minute, and a ceiling measured after the load compared two different machines. How many
    /// slices of load (and as many of ceiling) it runs: 10 s of each in a full run.
    pub fn rounds(self) -> u32 {
        match self {
            Size::Full => 10,
            Size::Short => 1,
        }
    }

    /// A count that is `full` in a full run, and small in a short one.
    pub fn count(self, full: usize, short: usize) -> usize {
        match self {
            Size::Full => full,
            Size::Short => short,
        }
    }
}

/// One figure of a scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub scenario: &'static str,
    pub metric: String,
    pub value: f64,
    pub unit: &'static str,
    /// What the same Postgres does at best (or the target, where no run can say), and the
    /// figure's share of it; `higher_is_better` says which way the ratio reads.
    pub ceiling: Option<f64>,
    pub ceiling_is: Option<String>,
    pub ratio: Option<f64>,
    pub higher_is_better: bool,
}

impl Figure {
    pub fn new(
        scenario: &'static str,
        metric: impl Into<String>,
        value: f64,
        unit: &'static str,
    ) -> Self {
        Self {
            scenario,
            metric: metric.into(),
            value,
            unit,
            ceiling: None,
            ceiling_is: None,
            ratio: None,
            higher_is_better: true,
        }
    }

    /// Beside a ceiling where more is better (throughput): the ratio is value / ceiling.
    pub fn against(mut self, ceiling: f64, what: impl Into<String>) -> Self {
        self.ceiling = Some(ceiling);
        self.ceiling_is = Some(what.into());
        self.ratio = (ceiling > 0.0).then(|| self.value / ceiling);
        self
    }

    /// Beside a bound where less is better (latency, cost): the ratio is value / bound.
    pub fn under(mut self, bound: f64, what: impl Into<String>) -> Self {
        self.ceiling = Some(bound);
        self.ceiling_is = Some(what.into());
        self.ratio = (bound > 0.0).then(|| self.value / bound);
        self.higher_is_better = false;
        self
    }
}

/// Latencies of one load, in milliseconds.
#[derive(Debug, Default, Clone)]
pub struct Latencies(pub Vec<f64>);

impl Latencies {
    /// The `p`th percentile (0..=100), nearest rank.
    pub fn percentile(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        let mut sorted = self.0.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted[rank.clamp(1, sorted.len()) - 1]
    }
}

/// One pgbench transaction in this many has its latency logged (`--sampling-rate`): enough
/// for a percentile, too few for the logging to slow the ceiling down.
const PGBENCH_SAMPLING: f64 = 0.1;

/// What pgbench measured, over one run or several slices.
#[derive(Debug, Clone, Default)]
pub struct PgbenchResult {
    pub transactions: u64,
    /// Seconds spent running transactions (connection set-up left out, as pgbench's tps does).
    pub seconds: f64,
    /// Sum over transactions of their latency, in milliseconds.
    latency_sum_ms: f64,
    /// pgbench's own CPU (its client threads): what the ceiling's load generator took from the
    /// cores it shares with Postgres.
    pub client_cpu: Duration,
    /// Latencies of a sample of its transactions (one in ten): the ceiling's own tail.
    pub sampled: Latencies,
}

impl PgbenchResult {
    pub fn tps(&self) -> f64 {
        self.transactions as f64 / self.seconds.max(f64::MIN_POSITIVE)
    }

    pub fn latency_ms(&self) -> f64 {
        self.latency_sum_ms / self.transactions.max(1) as f64
    }

    pub fn client_cpu_per_tx(&self) -> Duration {
        per_each(self.client_cpu, self.transactions)
    }

    /// This slice and another, as one measurement.
    pub fn add(&mut self, other: PgbenchResult) {
        self.transactions += other.transactions;
        self.seconds += other.seconds;
        self.latency_sum_ms += other.latency_sum_ms;
        self.client_cpu += other.client_cpu;
        self.sampled.0.extend(other.sampled.0);
    }
}

/// Runs pgbench on `database_url`'s server with these scripts (`file@weight`), `clients`
/// connections for `duration`; its transactions per second and mean latency.
pub fn pgbench(
    database_url: &str,
    scripts: &[(&Path, u32)],
    clients: u32,
    duration: Duration,
) -> anyhow::Result<PgbenchResult> {
    let logs = tempfile::tempdir()?;
    let mut cmd = Command::new(crate::process::pg_bin("pgbench"));
    cmd.args([
        "-n",
        "-c",
        &clients.to_string(),
        "-j",
        "2",
        "-T",
        &duration.as_secs().max(1).to_string(),
        "--log",
        "--sampling-rate",
        &PGBENCH_SAMPLING.to_string(),
    ])
    .arg("--log-prefix")
    .arg(logs.path().join("tx"));
    for (script, weight) in scripts {
        cmd.arg("-f").arg(format!("{}@{weight}", script.display()));
    }
    cmd.arg(database_url);
    let (text, client_cpu) = run_client(cmd, "pgbench")?;
    let mut result = parse_pgbench(&text, client_cpu)?;
    // One log per pgbench thread (`tx.<pid>`, `tx.<pid>.1`).
    for entry in std::fs::read_dir(logs.path())? {
        let log = std::fs::read_to_string(entry?.path())?;
        result.sampled.0.extend(parse_pgbench_log(&log)?);
    }
    Ok(result)
}

/// The latencies (ms) in a pgbench transaction log: each line is `client transaction
/// latency_us script epoch_s epoch_us`.
fn parse_pgbench_log(log: &str) -> anyhow::Result<Vec<f64>> {
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            line.split_whitespace()
                .nth(2)
                .and_then(|us| us.parse::<f64>().ok())
                .map(|us| us / 1000.0)
                .with_context(|| format!("pgbench log line `{line}`"))
        })
        .collect()
}

/// pgbench's report of one run, and the CPU it used.
fn parse_pgbench(text: &str, client_cpu: Duration) -> anyhow::Result<PgbenchResult> {
    let number_after = |prefix: &str| -> anyhow::Result<f64> {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .with_context(|| format!("pgbench printed no `{prefix}`: {text}"))?;
        line.split(['=', ':'])
            .nth(1)
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("pgbench line `{line}`"))
    };
    let transactions = number_after("number of transactions actually processed")? as u64;
    let tps = number_after("tps")?;
    Ok(PgbenchResult {
        transactions,
        seconds: transactions as f64 / tps.max(f64::MIN_POSITIVE),
        latency_sum_ms: number_after("latency average")? * transactions as f64,
        client_cpu,
        sampled: Latencies::default(),
    })
}

/// Runs a load generator (`what`, for errors) to its end: what it printed, and the CPU it
/// used (a child that exited and was waited for, counted through this process's reaped
/// children).
fn run_client(mut cmd: Command, what: &str) -> anyhow::Result<(String, Duration)> {
    let children_before = reaped_children_cpu(std::process::id());
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    let client_cpu = reaped_children_cpu(std::process::id()).saturating_sub(children_before);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(
        out.status.success(),
        "{what} failed: {}{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((text, client_cpu))
}

/// A total shared out over `n` (requests, transactions): the cost of each.
fn per_each(total: Duration, n: u64) -> Duration {
    total / u32::try_from(n.max(1)).unwrap_or(u32::MAX)
}

/// What wrk measured, over one run or several slices: the HTTP side's load generator, a C
/// event loop like pgbench's, so that both sides of a ratio pay a similar price for their client.
#[derive(Debug, Clone, Default)]
pub struct WrkResult {
    pub requests: u64,
    pub seconds: f64,
    /// Every answer's latency (wrk's histogram, to the microsecond).
    pub latencies: Latencies,
    /// Answers of 400 and above, and connections that failed or timed out.
    pub non_2xx: u64,
    pub socket_errors: u64,
    /// wrk's own CPU.
    pub client_cpu: Duration,
}

impl WrkResult {
    pub fn per_second(&self) -> f64 {
        self.requests as f64 / self.seconds.max(f64::MIN_POSITIVE)
    }

    pub fn client_cpu_per_request(&self) -> Duration {
        per_each(self.client_cpu, self.requests)
    }

    /// This slice and another, as one measurement.
    pub fn add(&mut self, other: WrkResult) {
        self.requests += other.requests;
        self.seconds += other.seconds;
        self.latencies.0.extend(other.latencies.0);
        self.non_2xx += other.non_2xx;
        self.socket_errors += other.socket_errors;
        self.client_cpu += other.client_cpu;
    }
}

/// Runs wrk against `url` with a Lua `script` (its `done` prints the two lines parsed here:
/// the counts, and the latency histogram as `microseconds:count` pairs) and the script's
/// arguments, `connections` connections on two threads for `duration`.
pub fn wrk(
    url: &str,
    script: &Path,
    script_args: &[&str],
    connections: u32,
    duration: Duration,
) -> anyhow::Result<WrkResult> {
    let mut cmd = Command::new("wrk");
    cmd.args([
        "-t",
        "2",
        "-c",
        &connections.to_string(),
        "-d",
        &format!("{}s", duration.as_secs().max(1)),
        "--timeout",
        "10s",
    ])
    .arg("-s")
    .arg(script)
    .arg(url)
    .arg("--")
    .args(script_args);
    let (text, client_cpu) = run_client(cmd, "wrk (Debian's package `wrk`)")?;
    parse_wrk(&text, client_cpu)
}

/// The two lines of wrk's script (the counts; the latency histogram), and the CPU wrk used.
fn parse_wrk(text: &str, client_cpu: Duration) -> anyhow::Result<WrkResult> {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("hive-bench: "))
        .with_context(|| format!("wrk's script printed no figures: {text}"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no `{name}` in wrk's line `{line}`"))
    };
    let histogram = text
        .lines()
        .find_map(|l| l.strip_prefix("hive-bench latency:"))
        .context("wrk's script printed no latencies")?;
    let mut latencies = Latencies::default();
    for pair in histogram.split_whitespace() {
        let parsed = pair
            .split_once(':')
            .and_then(|(us, n)| Some((us.parse::<f64>().ok()?, n.parse::<usize>().ok()?)));
        let (us, n) = parsed.with_context(|| format!("wrk latency `{pair}`"))?;
        latencies.0.extend(std::iter::repeat_n(us / 1000.0, n));
    }
    Ok(WrkResult {
        requests: field("requests")?,
        seconds: field("duration_us")? as f64 / 1e6,
        latencies,
        non_2xx: field("non2xx")?,
        socket_errors: field("socket_errors")?,
        client_cpu,
    })
}

/// The figures every throughput scenario prints: its rate against pgbench's, its p50 against
/// pgbench's mean latency, its p99 against the target, and both load generators' CPU.
pub fn throughput_figures(
    scenario: &'static str,
    rate: (String, f64),
    latencies: &Latencies,
    p99_target_ms: f64,
    client_cpu_per_request: Duration,
    ceiling: (&PgbenchResult, &str),
) -> Vec<Figure> {
    let (ceiling, ceiling_is) = ceiling;
    let per = |d: Duration| d.as_secs_f64() * 1e6;
    vec![
        Figure::new(scenario, rate.0, rate.1, "1/s").against(ceiling.tps(), ceiling_is),
        Figure::new(scenario, "p50 latency", latencies.percentile(50.0), "ms")
            .under(ceiling.latency_ms(), "pgbench mean latency"),
        Figure::new(scenario, "p99 latency", latencies.percentile(99.0), "ms")
            .under(p99_target_ms, "target"),
        // What the machine allows: the same statements, by pgbench, in the same run. A p99
        // target the ceiling itself misses is one no server in front of it can meet here.
        Figure::new(
            scenario,
            "p99 latency of the ceiling",
            ceiling.sampled.percentile(99.0),
            "ms",
        )
        .under(p99_target_ms, "target"),
        Figure::new(
            scenario,
            "load generator CPU per request",
            per(client_cpu_per_request),
            "µs",
        )
        .under(
            per(ceiling.client_cpu_per_tx()),
            "pgbench's CPU per transaction",
        ),
    ]
}

/// CPU this process (the load generator) has used so far, all its threads.
pub fn own_cpu() -> Duration {
    cpu_time(std::process::id())
}

/// CPU time (user + system) a process has used so far, from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> Duration {
    // utime and stime are fields 14 and 15 of the whole line.
    stat_ticks(pid, [14, 15])
}

/// CPU used by the children of `pid` that have exited and been waited for (cutime, cstime).
pub fn reaped_children_cpu(pid: u32) -> Duration {
    stat_ticks(pid, [16, 17])
}

/// The sum of the two numbered fields (counting from 1, as `man proc` does) of
/// `/proc/{pid}/stat`, clock ticks as a duration; zero for a process that is gone.
fn stat_ticks(pid: u32, fields: [usize; 2]) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the command name (field 2), which is in parentheses and may hold spaces.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return Duration::ZERO;
    };
    let after_name: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields
        .iter()
        .map(|&n| n - 3)
        .filter_map(|i| after_name.get(i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    // The kernel's USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

/// The process and all its descendants (a Postgres cluster: the postmaster and its backends).
pub fn process_tree(root: u32) -> Vec<u32> {
    let mut all = vec![root];
    let mut i = 0;
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let rest = stat.rsplit_once(')')?.1;
            let ppid = rest.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect();
    while i < all.len() {
        let parent = all[i];
        all.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    all
}

/// Resident memory of a process, in MiB, from `/proc/<pid>/status`.
pub fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Each figure's median over runs of one scenario (the runs list the same figures in the same
/// order): the value, the ceiling and the ratio each taken as its own median.
pub fn medians(runs: &[Vec<Figure>]) -> Vec<Figure> {
    let Some(first) = runs.first() else {
        return Vec::new();
    };
    let median = |mut values: Vec<f64>| -> Option<f64> {
        values.sort_by(|a, b| a.total_cmp(b));
        let n = values.len();
        match n {
            0 => None,
            _ if n % 2 == 1 => Some(values[n / 2]),
            _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
        }
    };
    (0..first.len())
        .map(|i| {
            let same: Vec<&Figure> = runs.iter().filter_map(|run| run.get(i)).collect();
            Figure {
                value: median(same.iter().map(|f| f.value).collect()).unwrap_or(0.0),
                ceiling: median(same.iter().filter_map(|f| f.ceiling).collect()),
                ratio: median(same.iter().filter_map(|f| f.ratio).collect()),
                ..first[i].clone()
            }
        })
        .collect()
}

/// Prints the figures as a table, a line each.
pub fn print(figures: &[Figure]) {
    println!(
        "{:<13} {:<34} {:>12} {:<6} {:>12}  {:>7}  ceiling",
        "scenario", "figure", "value", "unit", "ceiling", "ratio"
    );
    for f in figures {
        let ceiling = f
            .ceiling
            .map(|c| format!("{c:.2}"))
            .unwrap_or_else(|| "-".into());
        let ratio = f
            .ratio
            .map(|r| format!("{:.0}%", r * 100.0))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<13} {:<34} {:>12.2} {:<6} {:>12}  {:>7}  {}",
            f.scenario,
            f.metric,
            f.value,
            f.unit,
            ceiling,
            ratio,
            f.ceiling_is.as_deref().unwrap_or("")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgbench_slices_combine_weighted_by_their_transactions() {
        let report = |n: u64, tps: f64, latency: f64| {
            format!(
                "number of transactions actually processed: {n}\n\
                 latency average = {latency} ms\n\
                 tps = {tps} (without initial connection time)\n"
            )
        };
        let mut total = PgbenchResult::default();
        let fast = parse_pgbench(&report(3000, 3000.0, 1.0), Duration::from_millis(30)).unwrap();
        let slow = parse_pgbench(&report(1000, 1000.0, 4.0), Duration::from_millis(10)).unwrap();
        total.add(fast);
        total.add(slow);
        assert_eq!(total.transactions, 4000);
        assert!((total.tps() - 2000.0).abs() < 1e-6, "{}", total.tps());
        assert!((total.latency_ms() - 1.75).abs() < 1e-9);
        assert_eq!(total.client_cpu_per_tx(), Duration::from_micros(10));
        assert!(parse_pgbench("tps = 5\n", Duration::ZERO).is_err());
    }

    #[test]
    fn pgbench_logs_give_the_ceilings_percentiles() {
        let log = "0 1 1200 0 1732400000 100\n1 7 5400 0 1732400000 200\n";
        let mut total = PgbenchResult::default();
        let mut slice = PgbenchResult::default();
        slice.sampled.0 = parse_pgbench_log(log).unwrap();
        total.add(slice.clone());
        total.add(slice);
        assert_eq!(total.sampled.0.len(), 4);
        assert_eq!(total.sampled.percentile(50.0), 1.2);
        assert_eq!(total.sampled.percentile(99.0), 5.4);
        assert!(parse_pgbench_log("0 1\n").is_err());
    }

    #[test]
    fn wrk_histograms_give_exact_percentiles_across_slices() {
        let text = "Running 1s test\n\
                    hive-bench: requests=100 duration_us=1000000 non2xx=0 socket_errors=0\n\
                    hive-bench latency: 1000:98 9000:2\n";
        let mut total = parse_wrk(text, Duration::from_millis(2)).unwrap();
        total.add(parse_wrk(text, Duration::from_millis(2)).unwrap());
        assert_eq!(total.requests, 200);
        assert!((total.per_second() - 100.0).abs() < 1e-9);
        assert_eq!(total.latencies.percentile(50.0), 1.0);
        assert_eq!(total.latencies.percentile(99.0), 9.0);
        assert_eq!(total.client_cpu_per_request(), Duration::from_micros(20));
        assert!(parse_wrk("hive-bench: requests=1\n", Duration::ZERO).is_err());
    }

    #[test]
    fn medians_take_each_figure_from_the_middle_run() {
        let run = |value: f64, ceiling: f64| {
            vec![Figure::new("reads", "reads per second", value, "1/s").against(ceiling, "pgbench")]
        };
        let runs = [run(10.0, 20.0), run(30.0, 40.0), run(20.0, 100.0)];
        let medians = medians(&runs);
        assert_eq!(medians.len(), 1);
        assert_eq!(medians[0].value, 20.0);
        assert_eq!(medians[0].ceiling, Some(40.0));
        // The middle of the runs' ratios (0.5, 0.75, 0.2), not value over ceiling.
        assert_eq!(medians[0].ratio, Some(0.5));
        assert!(super::medians(&[]).is_empty());
    }
}
