//! How the binaries start: a bad setting stops them with one line naming it; several starting
//! at once on a fresh database all apply migrations and come up.

use std::process::Command;
use std::time::Duration;

use hive_tests::process::bin_path;
use hive_tests::stack::{Stack, StackOptions};

fn run_with(bin: &str, env: &[(String, String)]) -> std::process::Output {
    Command::new(bin_path(bin).unwrap())
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap()
}

fn one_line_naming(out: &std::process::Output, name: &str) {
    assert_eq!(out.status.code(), Some(2), "exit code");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains(name), "names {name}: {stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_settings_stop_the_binaries_with_one_line_and_several_start_at_once() {
    let mut stack = Stack::start(StackOptions::default()).await.expect("stack");
    let env = stack.env();
    let without = |name: &str| -> Vec<(String, String)> {
        env.iter().filter(|(k, _)| k != name).cloned().collect()
    };
    let with = |name: &str, value: &str| -> Vec<(String, String)> {
        let mut e = without(name);
        e.push((name.to_string(), value.to_string()));
        e
    };

    one_line_naming(
        &run_with("hive-api", &without("HIVE_JWT_SECRET")),
        "HIVE_JWT_SECRET",
    );
    one_line_naming(
        &run_with("hive-api", &with("HIVE_API_ADDR", "nowhere")),
        "HIVE_API_ADDR",
    );
    // An identity provider's key set without the issuer and audience that tell our tokens
    // from other apps' of the same provider.
    one_line_naming(
        &run_with(
            "hive-api",
            &with(
                "HIVE_JWKS_URL",
                "https://idp.example.com/.well-known/jwks.json",
            ),
        ),
        "HIVE_JWT_ISSUER",
    );
    one_line_naming(
        &run_with("hive-api", &with("HIVE_PLANS", "team=m5.large:5")),
        "HIVE_PLANS",
    );
    one_line_naming(
        &run_with("hive-worker", &without("DATABASE_URL")),
        "DATABASE_URL",
    );
    one_line_naming(
        &run_with("hive-worker", &with("HIVE_AMI_ID", "not-an-ami")),
        "HIVE_AMI_ID",
    );
    one_line_naming(
        &run_with("hive-worker", &with("CLOUDFLARE_API_BASE", "ftp://x")),
        "CLOUDFLARE_API_BASE",
    );
    one_line_naming(
        &run_with(
            "hive-worker",
            &with("HIVE_RECONCILE_SCHEDULE", "every ten minutes"),
        ),
        "HIVE_RECONCILE_SCHEDULE",
    );

    // A malformed configuration file stops every binary, naming the file and the key.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hive.toml");
    std::fs::write(
        &file,
        "[plans.pro]\ninstance_type = \"t4g.small\"\nnodes = 0\n",
    )
    .unwrap();
    let file = file.display().to_string();
    for bin in ["hive-api", "hive-worker"] {
        let out = run_with(bin, &with("HIVE_CONFIG_FILE", &file));
        one_line_naming(&out, &file);
        one_line_naming(&out, "plans.pro.nodes");
    }
    one_line_naming(
        &run_with("hive-api", &with("STRIPE_API_BASE", "stripe.com")),
        "STRIPE_API_BASE",
    );

    // Three workers and two apis on a database nobody has migrated yet, all at once.
    for _ in 0..3 {
        stack.start_worker().unwrap();
    }
    stack.start_api().unwrap();
    stack.start_api().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for worker in stack.workers.iter_mut() {
        assert!(worker.try_wait().is_none(), "a worker exited at start");
    }
    let client = reqwest::Client::new();
    for (_, addr) in &stack.apis {
        let health = client
            .get(format!("http://{addr}/healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status().as_u16(), 200);
    }
    let pool = stack.pool().await.unwrap();
    let (applied, distinct): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT version) FROM _sqlx_migrations WHERE success",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations"))
        .unwrap()
        .filter(|f| {
            f.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|e| e == "sql")
        })
        .count() as i64;
    assert_eq!(
        (applied, distinct),
        (files, files),
        "each migration applied exactly once"
    );
}
