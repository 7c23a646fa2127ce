//! End to end: a signed `checkout.session.completed` for plan `team` becomes five ready nodes,
//! with exactly what they need in moto (EC2, Secrets Manager, Route 53) and the Cloudflare
//! stand-in.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use aws_sdk_ec2::types::{Filter, HttpTokensState, InstanceAttributeName};
use base64::Engine;
use hive_tests::stack::{Stack, StackOptions, NODE_DOMAIN, WEBHOOK_SECRET};
use hive_tests::stripe_events::{signature, Fixtures};
use serde_json::Value;

const USER: &str = "user-team-e2e";

fn cloud_init_accepts(user_data: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let path = dir.path().join("user-data.yaml");
    std::fs::write(&path, user_data).map_err(|e| e.to_string())?;
    let out = std::process::Command::new("cloud-init")
        .args(["schema", "-c"])
        .arg(&path)
        .output()
        .map_err(|e| format!("cloud-init is not installed ({e}); the test command installs it"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn paid_team_checkout_becomes_five_ready_nodes_once() {
    let mut stack = Stack::start(StackOptions::default()).await.expect("stack");
    stack.start_api().expect("hive-api");
    stack.start_worker().expect("hive-worker");

    // Stripe delivers the same event five times at once.
    let event = Fixtures::load()
        .unwrap()
        .subscription_checkout(USER, "team", None)
        .unwrap();
    let body = serde_json::to_vec(&event).unwrap();
    let sig = signature(&body, WEBHOOK_SECRET);
    let deliveries = (0..5).map(|_| stack.post_webhook(&body, Some(&sig)));
    let answers = futures::future::join_all(deliveries).await;
    let mut created = 0;
    for answer in answers {
        let (status, body) = answer.unwrap();
        assert_eq!(status, 200, "{body}");
        created += body["nodes"].as_array().map(Vec::len).unwrap_or(0);
    }
    assert_eq!(created, 5, "five deliveries must create five nodes in all");

    let token = Stack::jwt(USER, 600);
    let nodes = stack
        .wait_all_status(&token, "ready", 5, Duration::from_secs(180))
        .await
        .unwrap();

    // What the app sees.
    let mut by_node: BTreeMap<String, Value> = BTreeMap::new();
    for node in &nodes {
        let id = node["id"].as_str().unwrap().to_string();
        let hostname = format!("{id}.{NODE_DOMAIN}");
        assert_eq!(node["step"], "ready");
        assert_eq!(node["instance_type"], "t4g.medium");
        assert_eq!(node["hostname"], hostname.as_str());
        assert_eq!(node["url"], format!("https://{hostname}").as_str());
        assert!(node["instance_id"]
            .as_str()
            .is_some_and(|i| i.starts_with("i-")));
        assert!(node["tunnel_id"].as_str().is_some());
        assert!(node["error"].is_null());
        by_node.insert(id, node.clone());
    }
    assert_eq!(by_node.len(), 5);
    let pool = stack.pool().await.unwrap();
    let (subscriptions, node_rows): (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM subscriptions), (SELECT count(*) FROM nodes)")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((subscriptions, node_rows), (1, 5));

    // Cloudflare: 5 tunnels with their ingress, 5 proxied CNAMEs into them.
    let cf = stack.cloudflare_state().await.unwrap();
    let tunnels = cf["tunnels"].as_array().unwrap();
    assert_eq!(tunnels.len(), 5, "{cf:#}");
    let tokens: Vec<String> = tunnels
        .iter()
        .map(|t| t["token"].as_str().unwrap().to_string())
        .collect();
    let mut tunnel_of: BTreeMap<String, String> = BTreeMap::new();
    for tunnel in tunnels {
        let name = tunnel["name"].as_str().unwrap();
        let node_id = name
            .strip_prefix("hive-")
            .expect("tunnel named hive-<node>");
        let node = by_node
            .get(node_id)
            .expect("a tunnel for every node and no other");
        assert_eq!(tunnel["id"], node["tunnel_id"]);
        assert_eq!(tunnel["remote_config"], true);
        let ingress = tunnel["config"]["ingress"]
            .as_array()
            .expect("ingress configured");
        assert_eq!(ingress[0]["hostname"], node["hostname"]);
        assert_eq!(ingress[0]["service"], "http://localhost:8080");
        assert!(
            ingress.last().unwrap().get("hostname").is_none(),
            "catch-all last"
        );
        tunnel_of.insert(
            node_id.to_string(),
            tunnel["id"].as_str().unwrap().to_string(),
        );
    }
    let records = cf["dns_records"].as_array().unwrap();
    assert_eq!(records.len(), 5, "{cf:#}");
    for record in records {
        let name = record["name"].as_str().unwrap();
        let node_id = name.strip_suffix(&format!(".{NODE_DOMAIN}")).unwrap();
        assert_eq!(record["type"], "CNAME");
        assert_eq!(record["proxied"], true);
        assert_eq!(
            record["content"],
            format!("{}.cfargotunnel.com", tunnel_of[node_id]).as_str()
        );
    }

    // EC2: exactly 5 running t4g instances with our tags and hardening.
    let ec2 = aws_sdk_ec2::Client::new(&stack.sdk);
    let described = ec2
        .describe_instances()
        .filters(Filter::builder().name("tag:hive:user").values(USER).build())
        .send()
        .await
        .unwrap();
    let instances: Vec<_> = described
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .collect();
    assert_eq!(instances.len(), 5);
    let mut instance_of: BTreeMap<String, String> = BTreeMap::new();
    for instance in &instances {
        let id = instance.instance_id().unwrap();
        let tag = |k: &str| {
            instance
                .tags()
                .iter()
                .find(|t| t.key() == Some(k))
                .and_then(|t| t.value())
                .map(str::to_string)
        };
        let node_id = tag("hive:node-id").expect("hive:node-id tag");
        let node = &by_node[&node_id];
        assert_eq!(node["instance_id"], id);
        assert_eq!(tag("hive:user").as_deref(), Some(USER));
        assert_eq!(
            tag("hive:subscription").as_deref(),
            node["subscription_id"].as_str()
        );
        assert_eq!(
            instance.state().and_then(|s| s.name()).map(|n| n.as_str()),
            Some("running")
        );
        assert_eq!(
            instance.instance_type().map(|t| t.as_str()),
            Some("t4g.medium")
        );
        assert_eq!(
            instance.metadata_options().and_then(|m| m.http_tokens()),
            Some(&HttpTokensState::Required),
            "IMDSv2 required"
        );
        assert!(instance.public_ip_address().is_none(), "no public IP");
        assert_eq!(instance.subnet_id(), Some(stack.aws.subnet_id.as_str()));
        let volume_ids: Vec<String> = instance
            .block_device_mappings()
            .iter()
            .filter_map(|m| m.ebs().and_then(|e| e.volume_id()).map(str::to_string))
            .collect();
        assert!(!volume_ids.is_empty());
        let volumes = ec2
            .describe_volumes()
            .set_volume_ids(Some(volume_ids))
            .send()
            .await
            .unwrap();
        assert!(
            volumes
                .volumes()
                .iter()
                .all(|v| v.encrypted() == Some(true)),
            "encrypted volumes"
        );

        let attribute = ec2
            .describe_instance_attribute()
            .instance_id(id)
            .attribute(InstanceAttributeName::UserData)
            .send()
            .await
            .unwrap();
        let encoded = attribute
            .user_data()
            .and_then(|u| u.value())
            .expect("user-data");
        let user_data = String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .unwrap(),
        )
        .unwrap();
        assert!(user_data.starts_with("#cloud-config"));
        assert!(user_data.len() <= 16 * 1024);
        assert!(user_data.contains(&format!("hive/nodes/{node_id}/tunnel-token")));
        for token in &tokens {
            assert!(
                !user_data.contains(token.as_str()),
                "a tunnel token is in user-data"
            );
        }
        if let Err(e) = cloud_init_accepts(&user_data) {
            panic!("cloud-init schema rejects the user-data: {e}");
        }
        instance_of.insert(node_id, id.to_string());
    }

    // Secrets Manager: one secret per node holding its tunnel's token, bound to its instance.
    let sm = aws_sdk_secretsmanager::Client::new(&stack.sdk);
    let listed = sm.list_secrets().max_results(100).send().await.unwrap();
    let secrets: Vec<_> = listed
        .secret_list()
        .iter()
        .filter(|s| s.name().is_some_and(|n| n.starts_with("hive/nodes/")))
        .collect();
    assert_eq!(secrets.len(), 5);
    for secret in secrets {
        let name = secret.name().unwrap();
        let node_id = name
            .strip_prefix("hive/nodes/")
            .and_then(|n| n.strip_suffix("/tunnel-token"))
            .unwrap();
        let bound = secret
            .tags()
            .iter()
            .find(|t| t.key() == Some("hive:instance-arn"))
            .and_then(|t| t.value())
            .expect("secret bound to an instance");
        assert!(
            bound.ends_with(&format!(":instance/{}", instance_of[node_id])),
            "{bound}"
        );
        let value = sm.get_secret_value().secret_id(name).send().await.unwrap();
        let tunnel = tunnels
            .iter()
            .find(|t| t["name"] == format!("hive-{node_id}").as_str())
            .unwrap();
        assert_eq!(value.secret_string(), tunnel["token"].as_str());
    }

    // Route 53: the public names point at Cloudflare's edge.
    let r53 = aws_sdk_route53::Client::new(&stack.sdk);
    let sets = r53
        .list_resource_record_sets()
        .hosted_zone_id(&stack.aws.zone_id)
        .send()
        .await
        .unwrap();
    let cnames: BTreeSet<(String, String)> = sets
        .resource_record_sets()
        .iter()
        .filter(|r| r.r#type().as_str() == "CNAME")
        .map(|r| {
            (
                r.name().trim_end_matches('.').to_string(),
                r.resource_records()[0].value().to_string(),
            )
        })
        .collect();
    let expected: BTreeSet<(String, String)> = by_node
        .keys()
        .map(|id| {
            let host = format!("{id}.{NODE_DOMAIN}");
            (host.clone(), format!("{host}.cdn.cloudflare.net"))
        })
        .collect();
    assert_eq!(cnames, expected);

    // Every step of every node is in its log, in order.
    let steps: Vec<(String,)> =
        sqlx::query_as("SELECT DISTINCT step FROM node_events WHERE kind = 'succeeded'")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        steps.len(),
        hive_jobs::model::PROVISIONING.len(),
        "every provisioning step succeeded at least once: {steps:?}"
    );
}
