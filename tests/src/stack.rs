//! The whole local stack on this machine: no cloud account, no internet.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;
use sqlx::PgPool;

use crate::aws_fixture::{sdk_config, AwsFixture, RegionFixture};
use crate::aws_iam::Policy;
use crate::aws_proxy::AwsProxy;
use crate::cloudflare_standin::StandIn;
use crate::process::{spawn_ours, Managed, Moto, Postgres};
use crate::stripe_standin::StripeStandIn;

pub const WEBHOOK_SECRET: &str = "whsec_local_stack_0123456789";
/// A second, older secret that is still accepted (rotation).
pub const OLD_WEBHOOK_SECRET: &str = "whsec_local_stack_old_987654";
pub const JWT_SECRET: &str = "local-stack-jwt-secret-0123456789";
pub const CLOUDFLARE_TOKEN: &str = "local-stack-cloudflare-token";
pub const STRIPE_SECRET_KEY: &str = "sk_test_local_stack_0123456789";
pub const CLOUDFLARE_ACCOUNT: &str = "0123456789abcdef0123456789abcdef";
pub const CLOUDFLARE_ZONE: &str = "fedcba9876543210fedcba9876543210";
pub const NODE_DOMAIN: &str = "nodes.hive.test";
pub const REGION: &str = "eu-west-1";
pub const INSTANCE_PROFILE: &str = "hive-node";

/// The worker's policy document from terraform/, filled in for moto's account and these
/// regions' images, subnets and groups, as terraform fills it for the real ones.
pub fn worker_policy(regions: &[RegionFixture], aws: &AwsFixture) -> anyhow::Result<Policy> {
    let account = crate::aws_proxy::MOTO_ACCOUNT;
    let arns = |each: &dyn Fn(&RegionFixture) -> Vec<String>| {
        serde_json::to_string(&regions.iter().flat_map(each).collect::<Vec<_>>())
    };
    let images = arns(&|r| vec![format!("arn:aws:ec2:{}::image/{}", r.region, r.ami_id)])?;
    let subnets = arns(&|r| {
        r.subnet_ids
            .iter()
            .map(|s| format!("arn:aws:ec2:{}:{account}:subnet/{s}", r.region))
            .collect()
    })?;
    let groups = arns(&|r| {
        vec![format!(
            "arn:aws:ec2:{}:{account}:security-group/{}",
            r.region, r.security_group_id
        )]
    })?;
    Policy::load(
        &crate::aws_iam::worker_policy_path(),
        &[
            ("account", account.to_string()),
            ("route53_zone_id", aws.zone_id.clone()),
            (
                "node_role_arn",
                format!("arn:aws:iam::{account}:role/{}", aws.instance_profile),
            ),
            ("image_arns", images),
            ("subnet_arns", subnets),
            ("security_group_arns", groups),
        ],
    )
}

/// An instance of ours as moto holds it.
#[derive(Debug, Clone)]
pub struct TaggedInstance {
    pub id: String,
    /// Its `hive:node-id` tag.
    pub node_id: String,
    /// `pending`, `running`, ..., `terminated`.
    pub state: String,
    pub instance_type: String,
    pub subnet_id: String,
}

/// One instance as moto holds it: its state, type and root volume size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceShape {
    pub state: String,
    pub instance_type: String,
    pub volume_gb: i32,
}

pub struct StackOptions {
    /// How long after its ingress is configured a tunnel reports `healthy`.
    pub connect_delay: Duration,
    /// Extra settings for the binaries (pacing, concurrency...).
    pub extra_env: Vec<(String, String)>,
    /// Where the binaries' logs go; stderr when unset.
    pub log_dir: Option<PathBuf>,
    /// Postgres loads `pg_stat_statements` (`hive-bench --statements`).
    pub track_statements: bool,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            // cloudflared connects a few seconds after its tunnel has its ingress, on the
            // tests' faster clock.
            connect_delay: Duration::from_millis(1000),
            extra_env: vec![
                ("HIVE_POLL_INTERVAL_MS".into(), "250".into()),
                ("HIVE_QUEUE_POLL_MS".into(), "200".into()),
                ("HIVE_RETRY_BASE_MS".into(), "100".into()),
                ("HIVE_RETRY_MAX_MS".into(), "2000".into()),
                ("HIVE_HTTP_TIMEOUT_MS".into(), "5000".into()),
            ],
            log_dir: None,
            track_statements: false,
        }
    }
}

pub struct Stack {
    pub pg: Postgres,
    pub moto: Moto,
    pub standin: StandIn,
    pub standin_addr: SocketAddr,
    /// Between the binaries and moto: AWS faults, `ClientToken`, instances held `pending`.
    pub aws_proxy: AwsProxy,
    pub aws_proxy_addr: SocketAddr,
    pub aws: AwsFixture,
    pub sdk: aws_config::SdkConfig,
    /// Stripe's API for the api's checkout and portal sessions.
    pub stripe: StripeStandIn,
    pub stripe_addr: SocketAddr,
    pub database_url: String,
    pub apis: Vec<(Managed, SocketAddr)>,
    pub workers: Vec<Managed>,
    /// The regions the worker's policy covers.
    policy_regions: std::sync::Mutex<Vec<RegionFixture>>,
    options: StackOptions,
    http: reqwest::Client,
    standin_task: tokio::task::JoinHandle<()>,
    aws_proxy_task: tokio::task::JoinHandle<()>,
    stripe_task: tokio::task::JoinHandle<()>,
}

impl Stack {
    /// Postgres, moto and the stand-in, with the AWS footprint in moto. No api or worker yet.
    pub async fn start(options: StackOptions) -> anyhow::Result<Stack> {
        let track_statements = options.track_statements;
        let (pg, moto) =
            tokio::task::spawn_blocking(move || -> anyhow::Result<(Postgres, Moto)> {
                Ok((Postgres::start_with(track_statements)?, Moto::start()?))
            })
            .await??;
        let admin = PgPool::connect(&pg.url("postgres")).await?;
        sqlx::query("CREATE DATABASE hive").execute(&admin).await?;
        admin.close().await;
        let database_url = pg.url("hive");
        let standin = StandIn::new(CLOUDFLARE_TOKEN, options.connect_delay);
        let (standin_addr, standin_task) = standin
            .clone()
            .serve(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await?;
        let aws_proxy = AwsProxy::new(&moto.endpoint());
        let (aws_proxy_addr, aws_proxy_task) = aws_proxy
            .clone()
            .serve(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await?;
        let stripe = StripeStandIn::new(STRIPE_SECRET_KEY)?;
        let (stripe_addr, stripe_task) = stripe
            .clone()
            .serve(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await?;
        // The tests' own view of AWS goes to moto directly, past any injected fault.
        let sdk = sdk_config(&moto.endpoint(), REGION).await;
        let aws = AwsFixture::create(&sdk, NODE_DOMAIN, INSTANCE_PROFILE).await?;
        // Every call of the binaries runs under the worker's policy from terraform/.
        aws_proxy.enforce(Some(worker_policy(std::slice::from_ref(&aws.home), &aws)?));
        Ok(Stack {
            policy_regions: std::sync::Mutex::new(vec![aws.home.clone()]),
            pg,
            moto,
            standin,
            standin_addr,
            aws_proxy,
            aws_proxy_addr,
            aws,
            sdk,
            stripe,
            stripe_addr,
            database_url,
            apis: Vec::new(),
            workers: Vec::new(),
            options,
            http: reqwest::Client::new(),
            standin_task,
            aws_proxy_task,
            stripe_task,
        })
    }

    /// The settings both binaries get, exactly as an operator would set them.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = [
            ("DATABASE_URL", self.database_url.clone()),
            ("HIVE_API_ADDR", "127.0.0.1:0".into()),
            (
                "STRIPE_WEBHOOK_SECRET",
                format!("{WEBHOOK_SECRET},{OLD_WEBHOOK_SECRET}"),
            ),
            ("HIVE_JWT_SECRET", JWT_SECRET.into()),
            // Many requests come from one loopback address in tests; those of the limits
            // set their own.
            ("HIVE_RATE_LIMIT", "100000".into()),
            // The stand-ins and moto have no rate limits; the tests of the budgets set theirs.
            ("HIVE_RATE_BUDGET_CLOUDFLARE", "10000/1s".into()),
            ("HIVE_RATE_BUDGET_EC2", "10000/1s".into()),
            ("HIVE_RATE_BUDGET_ROUTE53", "10000/1s".into()),
            ("HIVE_RATE_BUDGET_SECRETS", "10000/1s".into()),
            // The AWS proxy hides a new instance for two seconds (aws_strict::Timing): the
            // worker's window for EC2's eventual consistency, on the tests' faster clock.
            ("HIVE_EC2_CONSISTENCY_SECS", "8".into()),
            ("STRIPE_SECRET_KEY", STRIPE_SECRET_KEY.into()),
            // Where the tests' app sends its customers back to after Stripe.
            ("HIVE_RETURN_URL_ORIGINS", "https://app.example.com".into()),
            ("STRIPE_API_BASE", format!("http://{}/", self.stripe_addr)),
            ("AWS_REGION", REGION.into()),
            (
                "AWS_ENDPOINT_URL",
                format!("http://{}", self.aws_proxy_addr),
            ),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
            ("CLOUDFLARE_API_TOKEN", CLOUDFLARE_TOKEN.into()),
            ("CLOUDFLARE_ACCOUNT_ID", CLOUDFLARE_ACCOUNT.into()),
            ("CLOUDFLARE_ZONE_ID", CLOUDFLARE_ZONE.into()),
            ("CLOUDFLARE_API_BASE", self.cloudflare_api_base()),
            ("HIVE_NODE_DOMAIN", NODE_DOMAIN.into()),
            ("HIVE_ROUTE53_ZONE_ID", self.aws.zone_id.clone()),
            ("HIVE_AMI_ID", self.aws.ami_id.clone()),
            ("HIVE_SUBNET_ID", self.aws.subnet_id.clone()),
            ("HIVE_SECURITY_GROUP_ID", self.aws.security_group_id.clone()),
            ("HIVE_INSTANCE_PROFILE", self.aws.instance_profile.clone()),
            (
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info,sqlx=warn".into()),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        env.extend(self.options.extra_env.iter().cloned());
        env
    }

    /// Another region's footprint in moto (the home region's is made at start), which the
    /// worker's policy then covers, as terraform's map of regions makes it do.
    pub async fn add_region(&self, region: &str) -> anyhow::Result<RegionFixture> {
        let fixture =
            RegionFixture::create(&sdk_config(&self.moto.endpoint(), region).await).await?;
        let regions = {
            let mut regions = self
                .policy_regions
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            regions.push(fixture.clone());
            regions.clone()
        };
        self.aws_proxy
            .enforce(Some(worker_policy(&regions, &self.aws)?));
        Ok(fixture)
    }

    /// A `HIVE_CONFIG_FILE` naming these regions, then `more` (plans, say); removed when the
    /// returned path is dropped.
    pub fn regions_file(
        &self,
        regions: &[&RegionFixture],
        more: &str,
    ) -> anyhow::Result<tempfile::TempPath> {
        let mut text = String::new();
        for region in regions {
            text.push_str(&region.toml(&self.aws.instance_profile));
        }
        text.push_str(more);
        let file = tempfile::Builder::new()
            .prefix("hive-config-")
            .suffix(".toml")
            .tempfile()?;
        std::fs::write(file.path(), text)?;
        Ok(file.into_temp_path())
    }

    /// The options the stack was started with, to change settings of binaries started later.
    pub fn options_mut(&mut self) -> &mut StackOptions {
        &mut self.options
    }

    pub fn cloudflare_api_base(&self) -> String {
        format!("http://{}/client/v4/", self.standin_addr)
    }

    fn log_file(&self, name: &str) -> Option<PathBuf> {
        self.options
            .log_dir
            .as_ref()
            .map(|d| d.join(format!("{name}.log")))
    }

    /// Starts a hive-api; returns where it listens.
    pub fn start_api(&mut self) -> anyhow::Result<SocketAddr> {
        let log = self.log_file("hive-api");
        let (process, addr) = spawn_ours("hive-api", &self.env(), log.as_deref())?;
        let addr = addr.context("hive-api without an address")?;
        self.apis.push((process, addr));
        Ok(addr)
    }

    /// Starts one more hive-worker; returns its index in `workers`.
    pub fn start_worker(&mut self) -> anyhow::Result<usize> {
        self.start_worker_with(&[])
    }

    /// Starts a hive-worker with some settings changed.
    pub fn start_worker_with(&mut self, overrides: &[(&str, &str)]) -> anyhow::Result<usize> {
        let log = self.log_file(&format!("hive-worker-{}", self.workers.len()));
        let mut env = self.env();
        env.extend(
            overrides
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let (process, _) = spawn_ours("hive-worker", &env, log.as_deref())?;
        self.workers.push(process);
        Ok(self.workers.len() - 1)
    }

    /// Runs hivectl against the stack, with the worker's settings.
    pub fn hivectl(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        Ok(
            std::process::Command::new(crate::process::bin_path("hivectl")?)
                .args(args)
                // The worker's settings, DATABASE_URL among them (reconcile needs the clouds).
                .envs(self.env())
                .output()?,
        )
    }

    pub fn api_url(&self, path: &str) -> String {
        let addr = self
            .apis
            .first()
            .map(|(_, a)| *a)
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)));
        format!("http://{addr}{path}")
    }

    pub async fn pool(&self) -> anyhow::Result<PgPool> {
        Ok(PgPool::connect(&self.database_url).await?)
    }

    /// One connection to the stack's database.
    pub async fn connection(&self) -> anyhow::Result<sqlx::PgConnection> {
        use sqlx::Connection;
        Ok(sqlx::PgConnection::connect(&self.database_url).await?)
    }

    /// A JWT for `user`, valid for `ttl` (negative: already expired).
    pub fn jwt(user: &str, ttl_secs: i64) -> String {
        let claims = serde_json::json!({
            "sub": user,
            "exp": chrono::Utc::now().timestamp() + ttl_secs,
        });
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
        )
        .expect("HS256 encoding of plain claims")
    }

    /// POSTs a webhook body with the given signature header.
    pub async fn post_webhook(
        &self,
        body: &[u8],
        signature: Option<&str>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut req = self
            .http
            .post(self.api_url("/webhooks/stripe"))
            .header("content-type", "application/json")
            .body(body.to_vec());
        if let Some(sig) = signature {
            req = req.header("stripe-signature", sig);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let body = resp.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    /// Sends a signed `checkout.session.completed` of `plan` for `user`, built from Stripe's
    /// fixtures; returns the ids of the nodes it created.
    pub async fn send_checkout(&self, user: &str, plan: &str) -> anyhow::Result<Vec<String>> {
        Ok(self.send_subscription_checkout(user, plan).await?.1)
    }

    /// As [`Stack::send_checkout`]; also returns the Stripe subscription id.
    pub async fn send_subscription_checkout(
        &self,
        user: &str,
        plan: &str,
    ) -> anyhow::Result<(String, Vec<String>)> {
        let event =
            crate::stripe_events::Fixtures::load()?.subscription_checkout(user, plan, None)?;
        let subscription = event["data"]["object"]["subscription"]
            .as_str()
            .context("checkout without a subscription")?
            .to_string();
        // Stripe made the customer with the checkout: its portal knows them.
        if let Some(customer) = event["data"]["object"]["customer"].as_str() {
            self.stripe.add_customer(customer);
        }
        let answer = self.send_event(&event).await?;
        let nodes = answer["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n.as_str().map(str::to_string))
            .collect();
        Ok((subscription, nodes))
    }

    /// Sends a signed `customer.subscription.deleted` for `subscription_id`.
    pub async fn send_subscription_end(&self, subscription_id: &str) -> anyhow::Result<()> {
        let event =
            crate::stripe_events::Fixtures::load()?.subscription_deleted(subscription_id)?;
        self.send_event(&event).await?;
        Ok(())
    }

    /// Signs and posts one event; its status and answer, whatever they are.
    pub async fn post_event(&self, event: &Value) -> anyhow::Result<(u16, Value)> {
        let body = serde_json::to_vec(event)?;
        let signature = crate::stripe_events::signature(&body, WEBHOOK_SECRET);
        self.post_webhook(&body, Some(&signature)).await
    }

    /// Signs and posts one event; its answer, which must be 200.
    pub async fn send_event(&self, event: &Value) -> anyhow::Result<Value> {
        let body = serde_json::to_vec(event)?;
        let signature = crate::stripe_events::signature(&body, WEBHOOK_SECRET);
        let (status, answer) = self.post_webhook(&body, Some(&signature)).await?;
        anyhow::ensure!(
            status == 200,
            "{} answered {status}: {answer}",
            event["type"]
        );
        Ok(answer)
    }

    /// Waits until the node's row is in `state`; returns its error column. The api's status
    /// hides the teardown steps, so tests read the row.
    pub async fn wait_for_state(
        &self,
        node_id: &str,
        state: &str,
        within: Duration,
    ) -> anyhow::Result<Option<String>> {
        let pool = self.pool().await?;
        let deadline = std::time::Instant::now() + within;
        loop {
            let (now, error): (String, Option<String>) =
                sqlx::query_as("SELECT state, error FROM nodes WHERE id = $1::uuid")
                    .bind(node_id)
                    .fetch_one(&pool)
                    .await?;
            if now == state {
                pool.close().await;
                return Ok(error);
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "node {node_id} is {now}, never {state} (error: {error:?})"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// POSTs a JSON body to an api path with `token` and extra headers.
    pub async fn post_as(
        &self,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: &Value,
    ) -> anyhow::Result<(u16, Value)> {
        let mut req = self.http.post(self.api_url(path)).json(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let body = resp.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    /// GETs an api path as `user` (no token when `None`).
    pub async fn get_as(&self, path: &str, token: Option<&str>) -> anyhow::Result<(u16, Value)> {
        let mut req = self.http.get(self.api_url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let body = resp.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    /// Every instance in moto tagged `hive:node-id`, in any state (terminated ones included).
    pub async fn tagged_instances(&self) -> anyhow::Result<Vec<TaggedInstance>> {
        self.tagged_instances_in(&self.aws.region).await
    }

    /// The same in another region of moto.
    pub async fn tagged_instances_in(&self, region: &str) -> anyhow::Result<Vec<TaggedInstance>> {
        let ec2 = aws_sdk_ec2::Client::new(&sdk_config(&self.moto.endpoint(), region).await);
        let mut pages = ec2
            .describe_instances()
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name("tag-key")
                    .values("hive:node-id")
                    .build(),
            )
            .into_paginator()
            .send();
        let mut found = Vec::new();
        while let Some(page) = pages.next().await {
            for instance in page?.reservations().iter().flat_map(|r| r.instances()) {
                let node_id = instance
                    .tags()
                    .iter()
                    .find(|t| t.key() == Some("hive:node-id"))
                    .and_then(|t| t.value())
                    .unwrap_or_default();
                found.push(TaggedInstance {
                    id: instance.instance_id().unwrap_or_default().to_string(),
                    node_id: node_id.to_string(),
                    state: instance
                        .state()
                        .and_then(|s| s.name())
                        .map(|n| n.as_str().to_string())
                        .unwrap_or_default(),
                    instance_type: instance
                        .instance_type()
                        .map(|t| t.as_str().to_string())
                        .unwrap_or_default(),
                    subnet_id: instance.subnet_id().unwrap_or_default().to_string(),
                });
            }
        }
        Ok(found)
    }

    /// The instance `id` as moto holds it (read past the fault proxy).
    pub async fn instance_shape(&self, id: &str) -> anyhow::Result<InstanceShape> {
        let ec2 = aws_sdk_ec2::Client::new(&self.sdk);
        let out = ec2.describe_instances().instance_ids(id).send().await?;
        let instance = out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .next()
            .with_context(|| format!("moto does not know instance {id}"))?;
        let volume_id = instance
            .block_device_mappings()
            .iter()
            .filter_map(|m| m.ebs().and_then(|e| e.volume_id()))
            .next()
            .with_context(|| format!("instance {id} has no volume"))?;
        let volumes = ec2.describe_volumes().volume_ids(volume_id).send().await?;
        Ok(InstanceShape {
            state: instance
                .state()
                .and_then(|s| s.name())
                .map(|n| n.as_str().to_string())
                .unwrap_or_default(),
            instance_type: instance
                .instance_type()
                .map(|t| t.as_str().to_string())
                .unwrap_or_default(),
            volume_gb: volumes
                .volumes()
                .first()
                .and_then(|v| v.size())
                .with_context(|| format!("volume {volume_id} has no size"))?,
        })
    }

    /// The instance id recorded on a node's row.
    pub async fn instance_of(&self, node_id: &str) -> anyhow::Result<Option<String>> {
        let pool = self.pool().await?;
        let id = sqlx::query_scalar("SELECT instance_id FROM nodes WHERE id = $1::uuid")
            .bind(node_id)
            .fetch_one(&pool)
            .await?;
        pool.close().await;
        Ok(id)
    }

    /// Runs hivectl, which must succeed; its standard output.
    pub fn hivectl_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.hivectl(args)?;
        anyhow::ensure!(
            out.status.success(),
            "hivectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Everything our nodes could have left in moto and the stand-in: live tagged instances,
    /// node secrets, Route 53 CNAMEs, live tunnels and DNS records. Empty means a clean slate.
    pub async fn leftovers(&self) -> anyhow::Result<Vec<String>> {
        let mut left = Vec::new();
        for instance in self.tagged_instances().await? {
            if instance.state != "terminated" {
                left.push(format!(
                    "instance {} ({}) of {}",
                    instance.id, instance.state, instance.node_id
                ));
            }
        }
        let sm = aws_sdk_secretsmanager::Client::new(&self.sdk);
        let mut pages = sm.list_secrets().max_results(100).into_paginator().send();
        while let Some(page) = pages.next().await {
            for secret in page?.secret_list() {
                left.push(format!("secret {:?}", secret.name()));
            }
        }
        let r53 = aws_sdk_route53::Client::new(&self.sdk);
        let mut start: Option<(String, aws_sdk_route53::types::RrType)> = None;
        loop {
            let mut request = r53
                .list_resource_record_sets()
                .hosted_zone_id(&self.aws.zone_id);
            if let Some((name, kind)) = start.take() {
                request = request.start_record_name(name).start_record_type(kind);
            }
            let sets = request.send().await?;
            for set in sets.resource_record_sets() {
                if set.r#type().as_str() == "CNAME" {
                    left.push(format!("route53 record {}", set.name()));
                }
            }
            match (
                sets.is_truncated(),
                sets.next_record_name(),
                sets.next_record_type(),
            ) {
                (true, Some(name), Some(kind)) => start = Some((name.to_string(), kind.clone())),
                _ => break,
            }
        }
        let cf = self.cloudflare_state().await?;
        for tunnel in cf["tunnels"].as_array().into_iter().flatten() {
            if tunnel["deleted_at"].is_null() {
                left.push(format!("tunnel {}", tunnel["name"]));
            }
        }
        for record in cf["dns_records"].as_array().into_iter().flatten() {
            left.push(format!("cloudflare record {}", record["name"]));
        }
        Ok(left)
    }

    /// Waits until the app, with `token`, sees exactly `count` nodes, all `status`; returns
    /// them. A node that fails meanwhile ends the wait at once (unless `failed` is awaited).
    pub async fn wait_all_status(
        &self,
        token: &str,
        status: &str,
        count: usize,
        within: Duration,
    ) -> anyhow::Result<Vec<Value>> {
        let deadline = std::time::Instant::now() + within;
        loop {
            let (code, body) = self.get_as("/api/v1/nodes", Some(token)).await?;
            anyhow::ensure!(code == 200, "node list answered {code}: {body}");
            let nodes = body["nodes"].as_array().cloned().unwrap_or_default();
            if status != "failed" {
                if let Some(failed) = nodes.iter().find(|n| n["status"] == "failed") {
                    anyhow::bail!("a node failed: {failed}");
                }
            }
            if nodes.len() == count && nodes.iter().all(|n| n["status"] == status) {
                return Ok(nodes);
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "nodes not {status} in time: {body:#}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Creates, through the Cloudflare API, a tunnel and a proxied CNAME named like those of
    /// node `ghost`, which has no row: orphans for the reconciler.
    pub async fn plant_cloudflare_orphans(&self, ghost: &str) -> anyhow::Result<()> {
        let cf = self.cloudflare_api_base();
        let tunnel =
            serde_json::json!({ "name": format!("hive-{ghost}"), "config_src": "cloudflare" });
        let record = serde_json::json!({
            "type": "CNAME",
            "name": format!("{ghost}.{NODE_DOMAIN}"),
            "content": "x.cfargotunnel.com",
            "proxied": true
        });
        for (path, body) in [
            (
                format!("{cf}accounts/{CLOUDFLARE_ACCOUNT}/cfd_tunnel"),
                tunnel,
            ),
            (format!("{cf}zones/{CLOUDFLARE_ZONE}/dns_records"), record),
        ] {
            let answer = self
                .http
                .post(&path)
                .bearer_auth(CLOUDFLARE_TOKEN)
                .json(&body)
                .send()
                .await?;
            anyhow::ensure!(answer.status().is_success(), "{path}: {}", answer.status());
        }
        Ok(())
    }

    /// An instance tagged for the node `ghost` (which need not exist), launched straight in
    /// moto in `region`'s first subnet; its id.
    pub async fn plant_instance_orphan(
        &self,
        region: &RegionFixture,
        ghost: &str,
    ) -> anyhow::Result<String> {
        use aws_sdk_ec2::types::{InstanceType, ResourceType, Tag, TagSpecification};
        let ec2 =
            aws_sdk_ec2::Client::new(&sdk_config(&self.moto.endpoint(), &region.region).await);
        let out = ec2
            .run_instances()
            .image_id(&region.ami_id)
            .instance_type(InstanceType::T4gSmall)
            .min_count(1)
            .max_count(1)
            .subnet_id(&region.subnet_ids[0])
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Instance)
                    .tags(Tag::builder().key("hive:node-id").value(ghost).build())
                    .build(),
            )
            .send()
            .await?;
        Ok(out
            .instances()
            .first()
            .and_then(|i| i.instance_id())
            .context("launch without an instance")?
            .to_string())
    }
    /// Creates a node secret of node `ghost`, which has no row: an orphan for the reconciler.
    pub async fn plant_secret_orphan(&self, ghost: &str) -> anyhow::Result<()> {
        aws_sdk_secretsmanager::Client::new(&self.sdk)
            .create_secret()
            .name(format!("hive/nodes/{ghost}/tunnel-token"))
            .secret_string("orphaned")
            .send()
            .await?;
        Ok(())
    }

    /// Runs `hivectl reconcile --grace-secs 0`, which must succeed; its output.
    pub fn reconcile_now(&self) -> anyhow::Result<String> {
        let out = self.hivectl(&["reconcile", "--grace-secs", "0", "--yes"])?;
        anyhow::ensure!(
            out.status.success(),
            "hivectl reconcile: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The step a node failed at, from its row.
    pub async fn failed_step(&self, node_id: &str) -> anyhow::Result<Option<String>> {
        let pool = self.pool().await?;
        let step = sqlx::query_scalar("SELECT failed_step FROM nodes WHERE id = $1::uuid")
            .bind(node_id)
            .fetch_one(&pool)
            .await?;
        pool.close().await;
        Ok(step)
    }

    /// Everything the Cloudflare stand-in holds.
    pub async fn cloudflare_state(&self) -> anyhow::Result<Value> {
        Ok(self
            .http
            .get(format!("http://{}/__standin/state", self.standin_addr))
            .send()
            .await?
            .json()
            .await?)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Ours first (they hold connections), then the servers; each by its pid.
        self.workers.clear();
        self.apis.clear();
        self.standin_task.abort();
        self.aws_proxy_task.abort();
        self.stripe_task.abort();
    }
}
