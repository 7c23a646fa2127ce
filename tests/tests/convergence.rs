//! Converge, never merely adopt: a CNAME of the node's name that exists already is pointed at
//! the node's tunnel by the routing step, and one edited behind our back on a ready node is
//! found (`reconcile --dry-run` names it and changes nothing) and put back by the reconciler.

use std::time::Duration;

use hive_tests::stack::{Stack, StackOptions, CLOUDFLARE_TOKEN, CLOUDFLARE_ZONE, NODE_DOMAIN};
use serde_json::{json, Value};

/// The stand-in's records named `name`.
async fn records_named(stack: &Stack, name: &str) -> Vec<Value> {
    stack.cloudflare_state().await.unwrap()["dns_records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["name"] == name)
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cname_pointing_elsewhere_is_pointed_at_the_nodes_tunnel() {
    let mut stack = Stack::start(StackOptions::default()).await.unwrap();
    stack.start_api().unwrap();
    let user = "user-converge";
    let token = Stack::jwt(user, 600);
    // The node exists before any worker runs: a record of its name is there first, pointing
    // at some other tunnel (left by an earlier attempt, or made by hand).
    let node = stack.send_checkout(user, "pro").await.unwrap().remove(0);
    let hostname = format!("{node}.{NODE_DOMAIN}");
    let http = reqwest::Client::new();
    let records = format!(
        "{}zones/{CLOUDFLARE_ZONE}/dns_records",
        stack.cloudflare_api_base()
    );
    let planted = http
        .post(&records)
        .bearer_auth(CLOUDFLARE_TOKEN)
        .json(&json!({
            "type": "CNAME", "name": hostname, "content": "old-tunnel.cfargotunnel.com",
            "proxied": true,
        }))
        .send()
        .await
        .unwrap();
    assert!(planted.status().is_success());
    stack.start_worker().unwrap();
    let ready = stack
        .wait_all_status(&token, "ready", 1, Duration::from_secs(90))
        .await
        .unwrap();
    let tunnel = ready[0]["tunnel_id"].as_str().unwrap().to_string();
    let target = format!("{tunnel}.cfargotunnel.com");
    let named = records_named(&stack, &hostname).await;
    assert_eq!(named.len(), 1, "{named:?}");
    assert_eq!(
        named[0]["content"],
        target.as_str(),
        "the step adopted a wrong record"
    );
    let record_id = named[0]["id"].as_str().unwrap().to_string();

    // Edited behind our back on a ready node.
    let edited = http
        .put(format!("{records}/{record_id}"))
        .bearer_auth(CLOUDFLARE_TOKEN)
        .json(&json!({
            "type": "CNAME", "name": hostname, "content": "elsewhere.example.net",
            "proxied": true,
        }))
        .send()
        .await
        .unwrap();
    assert!(edited.status().is_success());

    let planned = stack
        .hivectl(&["reconcile", "--dry-run", "--grace-secs", "0", "--json"])
        .unwrap();
    assert!(planned.status.success());
    let planned: Value = serde_json::from_slice(&planned.stdout).unwrap();
    let repairs = planned["repaired"].as_array().unwrap();
    assert_eq!(repairs.len(), 1, "{planned}");
    assert!(repairs[0].as_str().unwrap().contains(&hostname));
    assert!(
        planned["removed"].as_array().unwrap().is_empty(),
        "{planned}"
    );
    assert!(
        planned["reprovisioned"].as_array().unwrap().is_empty(),
        "{planned}"
    );
    assert_eq!(
        records_named(&stack, &hostname).await[0]["content"],
        "elsewhere.example.net",
        "the dry run changed the record"
    );

    let out = stack.reconcile_now().unwrap();
    assert!(out.contains("repaired cloudflare record"), "{out}");
    let named = records_named(&stack, &hostname).await;
    assert_eq!(named.len(), 1);
    assert_eq!(
        named[0]["id"],
        record_id.as_str(),
        "the record was replaced, not repointed"
    );
    assert_eq!(named[0]["content"], target.as_str());
    // The node stayed ready, and its log says what was fixed.
    let (code, view) = stack
        .get_as(&format!("/api/v1/nodes/{node}"), Some(&token))
        .await
        .unwrap();
    assert_eq!(code, 200);
    assert_eq!(view["status"], "ready");
    let pool = stack.pool().await.unwrap();
    let logged: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM node_events WHERE node_id = $1::uuid AND kind = 'reconciled' \
         AND detail LIKE 'cname repointed%'",
    )
    .bind(&node)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(logged, 1);
    // A second pass finds nothing left to do.
    let again = stack.reconcile_now().unwrap();
    assert!(!again.contains("repaired"), "{again}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_stopped_behind_our_back_on_a_ready_node_is_started_again() {
    let mut stack = Stack::start(StackOptions::default()).await.unwrap();
    stack.start_api().unwrap();
    stack.start_worker().unwrap();
    let user = "user-stopped-behind";
    let token = Stack::jwt(user, 600);
    let node = stack.send_checkout(user, "pro").await.unwrap().remove(0);
    stack
        .wait_all_status(&token, "ready", 1, Duration::from_secs(90))
        .await
        .unwrap();
    let instance = stack.instance_of(&node).await.unwrap().unwrap();
    let ec2 = aws_sdk_ec2::Client::new(&stack.sdk);
    ec2.stop_instances()
        .instance_ids(&instance)
        .send()
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while stack.instance_shape(&instance).await.unwrap().state != "stopped" {
        assert!(std::time::Instant::now() < deadline, "never stopped");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let out = stack.reconcile_now().unwrap();
    assert!(
        out.contains(&format!("repaired instance {instance} started")),
        "{out}"
    );
    assert_eq!(
        stack.instance_shape(&instance).await.unwrap().state,
        "running"
    );
    // The same instance, not a new one; the node stayed ready and says what happened.
    let live: Vec<_> = stack
        .tagged_instances()
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.state != "terminated")
        .collect();
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(live[0].id, instance);
    let (_, view) = stack
        .get_as(&format!("/api/v1/nodes/{node}"), Some(&token))
        .await
        .unwrap();
    assert_eq!(view["status"], "ready");
    assert!(
        view["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "reconciled"),
        "{view}"
    );
    let again = stack.reconcile_now().unwrap();
    assert!(!again.contains("repaired"), "{again}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tunnel_deleted_behind_our_back_is_replaced_with_its_route_secret_and_instance() {
    let mut stack = Stack::start(StackOptions::default()).await.unwrap();
    stack.start_api().unwrap();
    stack.start_worker().unwrap();
    let user = "user-tunnel-gone";
    let token = Stack::jwt(user, 600);
    let node = stack.send_checkout(user, "pro").await.unwrap().remove(0);
    let ready = stack
        .wait_all_status(&token, "ready", 1, Duration::from_secs(90))
        .await
        .unwrap();
    let old_tunnel = ready[0]["tunnel_id"].as_str().unwrap().to_string();
    let old_instance = stack.instance_of(&node).await.unwrap().unwrap();
    let http = reqwest::Client::new();
    let account = hive_tests::stack::CLOUDFLARE_ACCOUNT;
    // As `cloudflared tunnel delete -f` does: its connections first (Cloudflare refuses to
    // delete a tunnel that has any).
    let cleaned = http
        .delete(format!(
            "{}accounts/{account}/cfd_tunnel/{old_tunnel}/connections",
            stack.cloudflare_api_base()
        ))
        .bearer_auth(CLOUDFLARE_TOKEN)
        .send()
        .await
        .unwrap();
    assert!(cleaned.status().is_success());
    let deleted = http
        .delete(format!(
            "{}accounts/{account}/cfd_tunnel/{old_tunnel}",
            stack.cloudflare_api_base()
        ))
        .bearer_auth(CLOUDFLARE_TOKEN)
        .send()
        .await
        .unwrap();
    assert!(deleted.status().is_success());

    let out = stack.reconcile_now().unwrap();
    assert!(out.contains(&format!("re-provisioning {node}")), "{out}");
    assert!(
        out.contains(&format!("instance {old_instance} replaced")),
        "{out}"
    );
    let ready = stack
        .wait_all_status(&token, "ready", 1, Duration::from_secs(90))
        .await
        .unwrap();
    let new_tunnel = ready[0]["tunnel_id"].as_str().unwrap().to_string();
    assert_ne!(new_tunnel, old_tunnel);

    // The name routes into the new tunnel.
    let hostname = format!("{node}.{NODE_DOMAIN}");
    let named = records_named(&stack, &hostname).await;
    assert_eq!(named.len(), 1);
    assert_eq!(
        named[0]["content"],
        format!("{new_tunnel}.cfargotunnel.com")
    );
    // The secret holds the new tunnel's token.
    let new_token: Value = http
        .get(format!(
            "{}accounts/{account}/cfd_tunnel/{new_tunnel}/token",
            stack.cloudflare_api_base()
        ))
        .bearer_auth(CLOUDFLARE_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sm = aws_sdk_secretsmanager::Client::new(&stack.sdk);
    let stored = sm
        .get_secret_value()
        .secret_id(format!("hive/nodes/{node}/tunnel-token"))
        .send()
        .await
        .unwrap();
    assert_eq!(stored.secret_string(), new_token["result"].as_str());
    // No instance still runs with the old token: the old one is gone, one new one runs.
    let instances = stack.tagged_instances().await.unwrap();
    let live: Vec<_> = instances
        .iter()
        .filter(|i| !matches!(i.state.as_str(), "terminated" | "shutting-down"))
        .collect();
    assert_eq!(live.len(), 1, "{instances:?}");
    assert_ne!(live[0].id, old_instance);
    assert!(instances.iter().any(
        |i| i.id == old_instance && matches!(i.state.as_str(), "terminated" | "shutting-down")
    ));
    let again = stack.reconcile_now().unwrap();
    assert!(
        again.contains("0 orphan(s) removed, 0 node(s) re-provisioned"),
        "{again}"
    );
    assert!(!again.contains("repaired"), "{again}");
}

/// The binding tag of the node's secret, as moto holds it (`None`: no secret).
async fn secret_binding(stack: &Stack, node: &str) -> Option<Option<String>> {
    let sm = aws_sdk_secretsmanager::Client::new(&stack.sdk);
    match sm
        .describe_secret()
        .secret_id(format!("hive/nodes/{node}/tunnel-token"))
        .send()
        .await
    {
        Ok(secret) if secret.deleted_date().is_none() => Some(
            secret
                .tags()
                .iter()
                .find(|t| t.key() == Some("hive:instance-arn"))
                .and_then(|t| t.value())
                .map(str::to_string),
        ),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_secret_unbound_or_gone_and_an_instance_resized_behind_our_back_are_converged() {
    let mut options = StackOptions::default();
    options
        .extra_env
        .push(("HIVE_RECONCILE_SCHEDULE".into(), "off".into()));
    let mut stack = Stack::start(options).await.unwrap();
    stack.start_api().unwrap();
    stack.start_worker().unwrap();
    let user = "user-drift";
    let token = Stack::jwt(user, 600);
    let node = stack.send_checkout(user, "pro").await.unwrap().remove(0);
    stack
        .wait_all_status(&token, "ready", 1, Duration::from_secs(90))
        .await
        .unwrap();
    let instance = stack.instance_of(&node).await.unwrap().unwrap();
    let bound = secret_binding(&stack, &node).await.unwrap().unwrap();
    assert!(bound.ends_with(&instance), "{bound}");

    // Bound to another instance behind our back: bound back to the node's.
    let sm = aws_sdk_secretsmanager::Client::new(&stack.sdk);
    sm.tag_resource()
        .secret_id(format!("hive/nodes/{node}/tunnel-token"))
        .tags(
            aws_sdk_secretsmanager::types::Tag::builder()
                .key("hive:instance-arn")
                .value("arn:aws:ec2:eu-west-1:123456789012:instance/i-0someoneelse")
                .build(),
        )
        .send()
        .await
        .unwrap();
    let out = stack.reconcile_now().unwrap();
    assert!(out.contains("bound"), "{out}");
    assert_eq!(secret_binding(&stack, &node).await.unwrap(), Some(bound));

    // Gone: the node goes back to storing it, and ends ready with a secret bound to the same
    // instance.
    sm.delete_secret()
        .secret_id(format!("hive/nodes/{node}/tunnel-token"))
        .force_delete_without_recovery(true)
        .send()
        .await
        .unwrap();
    let out = stack.reconcile_now().unwrap();
    assert!(out.contains(&node), "{out}");
    stack
        .wait_for_state(&node, "ready", Duration::from_secs(90))
        .await
        .unwrap();
    let bound = secret_binding(&stack, &node).await.unwrap().unwrap();
    assert!(bound.ends_with(&instance), "{bound}");
    assert_eq!(
        stack.instance_of(&node).await.unwrap(),
        Some(instance.clone())
    );

    // Resized behind our back: the resize workflow brings it back to the plan's type.
    let ec2 = aws_sdk_ec2::Client::new(&stack.sdk);
    ec2.stop_instances()
        .instance_ids(&instance)
        .send()
        .await
        .unwrap();
    ec2.modify_instance_attribute()
        .instance_id(&instance)
        .instance_type(
            aws_sdk_ec2::types::AttributeValue::builder()
                .value("t4g.large")
                .build(),
        )
        .send()
        .await
        .unwrap();
    ec2.start_instances()
        .instance_ids(&instance)
        .send()
        .await
        .unwrap();
    let out = stack.reconcile_now().unwrap();
    assert!(out.contains("t4g.large"), "{out}");
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let shape = stack.instance_shape(&instance).await.unwrap();
        let (_, view) = stack
            .get_as(&format!("/api/v1/nodes/{node}"), Some(&token))
            .await
            .unwrap();
        if shape.instance_type == "t4g.small"
            && shape.state == "running"
            && view["status"] == "ready"
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never converged: {shape:?} {}",
            view["status"]
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let again = stack.reconcile_now().unwrap();
    assert!(!again.contains("repaired"), "{again}");
}
