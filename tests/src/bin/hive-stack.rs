//! The local stack, for people: `hive-stack up` brings up Postgres, moto, the Cloudflare
//! stand-in, hive-api and hive-worker on this machine and prints how to use them;
//! `hive-stack send-checkout --user U --plan P` sends a signed test checkout to it;
//! `hive-stack token --user U` prints a JWT for the app's calls.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use hive_tests::stack::{Stack, StackOptions, WEBHOOK_SECRET};
use hive_tests::stripe_events::{signature, Fixtures};
use serde_json::json;

fn state_file() -> PathBuf {
    PathBuf::from(std::env::var("HIVE_STACK_DIR").unwrap_or_else(|_| ".stack".into()))
        .join("stack.json")
}

fn flag(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        None | Some("up") => up().await,
        Some("send-checkout") => send_checkout(&args).await,
        Some("token") => {
            println!("{}", Stack::jwt(&flag(&args, "--user", "demo-user"), 3600));
            Ok(())
        }
        Some(other) => Err(anyhow::anyhow!(
            "unknown command `{other}`: use up, send-checkout or token"
        )),
    };
    if let Err(e) = result {
        eprintln!("hive-stack: {e:#}");
        std::process::exit(1);
    }
}

async fn up() -> anyhow::Result<()> {
    let dir = state_file().parent().map(PathBuf::from).unwrap_or_default();
    std::fs::create_dir_all(&dir)?;
    let dir = dir.canonicalize()?;
    let mut options = StackOptions {
        connect_delay: Duration::from_secs(3),
        log_dir: Some(dir.clone()),
        ..StackOptions::default()
    };
    options
        .extra_env
        .push(("HIVE_POLL_INTERVAL_MS".into(), "1000".into()));
    let mut stack = Stack::start(options).await?;
    let api = stack.start_api()?;
    stack.start_worker()?;
    let state = json!({
        "api": format!("http://{api}"),
        "database_url": stack.database_url,
        "aws_endpoint_url": stack.moto.endpoint(),
        "cloudflare_api_base": stack.cloudflare_api_base(),
    });
    std::fs::write(state_file(), serde_json::to_vec_pretty(&state)?)?;
    let token = Stack::jwt("demo-user", 3600);
    println!(
        "Hive local stack is up (Ctrl-C stops everything).

  hive-api          http://{api}
  Postgres          {db}
  moto (AWS)        {aws}
  Cloudflare API    {cf}
  Stripe API        http://{stripe}/
  logs              {logs}

Send a signed test checkout (plan team = 5 nodes, pro = 1):
  cargo run -q -p hive-tests --bin hive-stack -- send-checkout --user demo-user --plan team

Watch the nodes become ready:
  curl -s -H 'Authorization: Bearer {token}' http://{api}/api/v1/nodes
",
        db = stack.database_url,
        aws = stack.moto.endpoint(),
        cf = stack.cloudflare_api_base(),
        stripe = stack.stripe_addr,
        logs = dir.display(),
    );
    hive_jobs::telemetry::shutdown_signal().await;
    println!("stopping");
    drop(stack);
    let _ = std::fs::remove_file(state_file());
    Ok(())
}

async fn send_checkout(args: &[String]) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(state_file())
        .context("no local stack is running (start it with scripts/stack.sh)")?;
    let state: serde_json::Value = serde_json::from_str(&text)?;
    let api = state["api"].as_str().context("stack state without api")?;
    let user = flag(args, "--user", "demo-user");
    let plan = flag(args, "--plan", "pro");
    let event = Fixtures::load()?.subscription_checkout(&user, &plan, None)?;
    let body = serde_json::to_vec(&event)?;
    let resp = reqwest::Client::new()
        .post(format!("{api}/webhooks/stripe"))
        .header("content-type", "application/json")
        .header("stripe-signature", signature(&body, WEBHOOK_SECRET))
        .body(body)
        .send()
        .await?;
    let status = resp.status();
    let answer: serde_json::Value = resp.json().await.unwrap_or_default();
    println!("{status} {answer}");
    if !status.is_success() {
        bail!("the api refused the checkout");
    }
    println!(
        "watch: curl -s -H 'Authorization: Bearer {}' {api}/api/v1/nodes",
        Stack::jwt(&user, 3600)
    );
    Ok(())
}
