//! The published contract: `/openapi.json` is a valid OpenAPI 3.1 document (checked by
//! openapi-spec-validator), `/docs` renders it, and schemathesis, fuzzing the running api with
//! a valid token (the webhook aside: Stripe signs it, not the app), finds no 5xx and no answer
//! that the document does not describe.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use hive_tests::stack::{Stack, StackOptions};

/// Where scripts/install-deps.sh put schemathesis and openapi-spec-validator.
fn tools_venv() -> PathBuf {
    if let Ok(dir) = std::env::var("HIVE_SCHEMATHESIS_VENV") {
        return PathBuf::from(dir);
    }
    let tools = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/tools.env"),
    )
    .expect("scripts/tools.env");
    let version = tools
        .lines()
        .find_map(|l| l.strip_prefix("SCHEMATHESIS_VERSION="))
        .expect("SCHEMATHESIS_VERSION in tools.env")
        .trim_matches('"');
    let home = std::env::var("HOME").expect("HOME");
    PathBuf::from(home).join(format!(".cache/hive-tools/schemathesis-{version}"))
}

fn tool(name: &str) -> PathBuf {
    let path = tools_venv().join("bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: run scripts/install-deps.sh",
        path.display()
    );
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_keeps_its_published_contract_under_schemathesis() {
    // The team plan has a Stripe price, so that checkouts can be bought.
    let config = tempfile::tempdir().unwrap();
    let file = config.path().join("hive.toml");
    std::fs::write(
        &file,
        "[plans.pro]\ninstance_type = \"t4g.small\"\nnodes = 1\n\n\
         [plans.team]\ninstance_type = \"t4g.medium\"\nnodes = 5\nvolume_gb = 50\n\
         prices = [\"price_team_test\"]\n",
    )
    .unwrap();
    let mut options = StackOptions::default();
    options
        .extra_env
        .push(("HIVE_CONFIG_FILE".into(), file.display().to_string()));
    let mut stack = Stack::start(options).await.unwrap();
    stack.stripe.add_price("price_team_test");
    stack.start_api().unwrap();
    stack.start_worker().unwrap();
    // A user with ready nodes, so that reads answer real nodes too.
    let user = "contract-user";
    let token = Stack::jwt(user, 3600);
    stack.send_checkout(user, "team").await.unwrap();
    stack
        .wait_all_status(&token, "ready", 5, Duration::from_secs(120))
        .await
        .unwrap();

    let http = reqwest::Client::new();
    let document = http
        .get(stack.api_url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(document.status().as_u16(), 200);
    let document: serde_json::Value = document.json().await.unwrap();
    assert_eq!(document["openapi"], "3.1.0");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&document).unwrap()).unwrap();
    let validated = Command::new(tool("openapi-spec-validator"))
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        validated.status.success(),
        "the document is not valid OpenAPI: {}{}",
        String::from_utf8_lossy(&validated.stdout),
        String::from_utf8_lossy(&validated.stderr)
    );

    let docs = http.get(stack.api_url("/docs")).send().await.unwrap();
    assert_eq!(docs.status().as_u16(), 200);
    let page = docs.text().await.unwrap();
    assert!(
        page.contains("<html") && page.contains("Hive Provisioner API"),
        "{page}"
    );

    // The token as the document's bearer scheme, so that schemathesis also tries requests
    // without it (they must be 401).
    let settings = dir.path().join("schemathesis.toml");
    std::fs::write(
        &settings,
        format!("[auth.openapi.bearer]\nbearer = \"{token}\"\n"),
    )
    .unwrap();
    let run = Command::new(tool("schemathesis"))
        .arg("--config-file")
        .arg(&settings)
        .args(["run", &stack.api_url("/openapi.json")])
        .args(["--exclude-path", "/webhooks/stripe"])
        // Every check but one: `use_after_free` wants a deleted resource to read 404 at once,
        // while a node's deletion is asynchronous by design (`202`): the app reads it
        // `terminating`, then `terminated`, as Kubernetes shows an object with finalizers.
        .args(["--checks", "all", "--exclude-checks", "use_after_free"])
        .args(["--max-examples", "30"])
        .args(["--request-timeout", "20"])
        // One worker: schemathesis 4.32 has failed with an internal KeyError with two.
        .args(["--workers", "1"])
        .arg("--no-color")
        // Keeps the waits of `/wait` short (see the hook's comment).
        .env("SCHEMATHESIS_HOOKS", "hive_hooks")
        .env(
            "PYTHONPATH",
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemathesis"),
        )
        .current_dir(dir.path())
        .output()
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(run.status.success(), "schemathesis failed:\n{report}");
    // It really ran every operation of the app (the webhook aside).
    assert!(
        report.contains("Tested: 13"),
        "schemathesis did not test every operation:\n{report}"
    );
}
