//! Fixtures of many nodes at once, made straight in the clouds' stand-ins and the tables (a
//! workflow per node would take minutes): for the reconciler's scale test and benchmark.

use anyhow::Context;
use aws_sdk_ec2::types::{InstanceType, Tag};
use futures_util::stream::{self, StreamExt, TryStreamExt};
use uuid::Uuid;

use crate::cloudflare_standin::{DnsRecord, Tunnel};
use crate::stack::{Stack, CLOUDFLARE_ACCOUNT, CLOUDFLARE_ZONE, NODE_DOMAIN};

/// One seeded ready node and what it owns.
pub struct Seeded {
    pub node: Uuid,
    pub instance: String,
    pub arn: String,
    pub tunnel: Uuid,
}

/// `count` (a multiple of 500) ready `pro` nodes of one subscription, each with its running
/// instance (tagged), its secret (bound), its tunnel, its proxied CNAME and its Route 53
/// record, as provisioning leaves them: a reconcile pass over them finds nothing to do.
pub async fn ready_nodes(stack: &Stack, count: usize) -> anyhow::Result<Vec<Seeded>> {
    // Instances in moto, each tagged with its node (tags one by one, below).
    let owner_and_ids = launch_instances(stack, count, "10.42.64.0/18").await?;
    let seeded: Vec<Seeded> = owner_and_ids
        .into_iter()
        .map(|(owner, id)| Seeded {
            node: Uuid::new_v4(),
            arn: format!("arn:aws:ec2:{}:{owner}:instance/{id}", stack.aws.region),
            instance: id,
            tunnel: Uuid::new_v4(),
        })
        .collect();
    let ec2 = aws_sdk_ec2::Client::new(&stack.sdk);
    let sm = aws_sdk_secretsmanager::Client::new(&stack.sdk);
    stream::iter(seeded.iter().map(|s| {
        let ec2 = ec2.clone();
        let sm = sm.clone();
        async move {
            ec2.create_tags()
                .resources(&s.instance)
                .tags(
                    Tag::builder()
                        .key("hive:node-id")
                        .value(s.node.to_string())
                        .build(),
                )
                .send()
                .await?;
            sm.create_secret()
                .name(format!("hive/nodes/{}/tunnel-token", s.node))
                .secret_string("token")
                .tags(
                    aws_sdk_secretsmanager::types::Tag::builder()
                        .key("hive:node-id")
                        .value(s.node.to_string())
                        .build(),
                )
                .tags(
                    aws_sdk_secretsmanager::types::Tag::builder()
                        .key("hive:instance-arn")
                        .value(&s.arn)
                        .build(),
                )
                .send()
                .await?;
            anyhow::Ok(())
        }
    }))
    .buffer_unordered(16)
    .try_collect::<Vec<()>>()
    .await?;

    // Their tunnels and proxied CNAMEs in the Cloudflare stand-in.
    {
        let mut store = stack
            .standin
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let old = chrono::Utc::now() - chrono::TimeDelta::hours(1);
        for s in &seeded {
            store.tunnels.insert(
                s.tunnel,
                Tunnel {
                    id: s.tunnel,
                    account: CLOUDFLARE_ACCOUNT.into(),
                    name: format!("hive-{}", s.node),
                    created_at: old,
                    deleted_at: None,
                    config_src: "cloudflare".into(),
                    token: "token".into(),
                    config: None,
                    configured_at: Some(old),
                },
            );
            let id = Uuid::new_v4().simple().to_string();
            store.dns.insert(
                id.clone(),
                DnsRecord {
                    id,
                    zone: CLOUDFLARE_ZONE.into(),
                    record_type: "CNAME".into(),
                    name: format!("{}.{NODE_DOMAIN}", s.node),
                    content: format!("{}.cfargotunnel.com", s.tunnel),
                    proxied: true,
                    ttl: 1,
                    created_on: old,
                },
            );
        }
    }

    // Their Route 53 CNAMEs, a thousand a change batch (Route 53's most).
    let r53 = aws_sdk_route53::Client::new(&stack.sdk);
    for chunk in seeded.chunks(1000) {
        let mut batch = aws_sdk_route53::types::ChangeBatch::builder();
        for s in chunk {
            let hostname = format!("{}.{NODE_DOMAIN}", s.node);
            batch = batch.changes(
                aws_sdk_route53::types::Change::builder()
                    .action(aws_sdk_route53::types::ChangeAction::Create)
                    .resource_record_set(crate::aws_fixture::node_cname(&hostname, 300)?)
                    .build()?,
            );
        }
        r53.change_resource_record_sets()
            .hosted_zone_id(&stack.aws.zone_id)
            .change_batch(batch.build()?)
            .send()
            .await
            .context("creating the seeded nodes' Route 53 records")?;
    }

    // Their rows: one subscription's ready nodes.
    let pool = stack.pool().await?;
    sqlx::query(
        "INSERT INTO stripe_events (id, event_type, livemode, payload) \
         VALUES ('evt_seed', 'checkout.session.completed', false, '{}')",
    )
    .execute(&pool)
    .await?;
    let subscription = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO subscriptions (id, stripe_subscription_id, user_id, plan, region, \
         stripe_event_id) VALUES ($1, 'sub_seed', 'user-scale', 'pro', $2, 'evt_seed')",
    )
    .bind(subscription)
    .bind(&stack.aws.region)
    .execute(&pool)
    .await?;
    let ids: Vec<Uuid> = seeded.iter().map(|s| s.node).collect();
    let instances: Vec<String> = seeded.iter().map(|s| s.instance.clone()).collect();
    let tunnels: Vec<String> = seeded.iter().map(|s| s.tunnel.to_string()).collect();
    let mut tx = pool.begin().await?;
    // Seeded as they would stand after provisioning; the guard on legal moves is for the
    // workflows, not for a fixture.
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO nodes (id, subscription_id, ordinal, user_id, region, instance_type, \
         volume_gb, hostname, state, tunnel_id, instance_id, applied_instance_type, \
         applied_volume_gb) \
         SELECT n.id, $2, n.ordinal, 'user-scale', $3, 't4g.small', 10, n.id::text || '.' || $4, \
         'ready', n.tunnel, n.instance, 't4g.small', 10 \
         FROM unnest($1::uuid[], $5::text[], $6::text[]) WITH ORDINALITY \
             AS n(id, instance, tunnel, ordinal)",
    )
    .bind(&ids)
    .bind(subscription)
    .bind(&stack.aws.region)
    .bind(NODE_DOMAIN)
    .bind(&instances)
    .bind(&tunnels)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    pool.close().await;
    Ok(seeded)
}

/// `count` (a multiple of 500) t4g.small instances launched in moto, 500 a call, in a new
/// subnet of `cidr` with room for them all: (owner account, instance id) each.
async fn launch_instances(
    stack: &Stack,
    count: usize,
    cidr: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    let ec2 = aws_sdk_ec2::Client::new(&stack.sdk);
    let subnet = ec2
        .create_subnet()
        .vpc_id(&stack.aws.vpc_id)
        .cidr_block(cidr)
        .send()
        .await?;
    let subnet = subnet
        .subnet()
        .and_then(|s| s.subnet_id())
        .context("subnet without id")?
        .to_string();
    let mut launched = Vec::with_capacity(count);
    for _ in 0..count.div_ceil(500) {
        let out = ec2
            .run_instances()
            .image_id(&stack.aws.ami_id)
            .instance_type(InstanceType::T4gSmall)
            .min_count(500)
            .max_count(500)
            .subnet_id(&subnet)
            .send()
            .await?;
        let owner = out.owner_id().unwrap_or("123456789012").to_string();
        for instance in out.instances() {
            let id = instance.instance_id().context("instance without id")?;
            launched.push((owner.clone(), id.to_string()));
        }
    }
    anyhow::ensure!(
        launched.len() >= count,
        "{} instances launched",
        launched.len()
    );
    launched.truncate(count);
    Ok(launched)
}

/// `count` (a multiple of 500) `pro` nodes of as many users, each waiting for its instance
/// (`waiting_for_instance`, its instance launched in moto and held `pending` by the AWS
/// proxy), each with a job due in a second, as a region slow to start instances leaves them.
pub async fn waiting_nodes(stack: &Stack, count: usize) -> anyhow::Result<Vec<Uuid>> {
    let instances: Vec<String> = launch_instances(stack, count, "10.42.128.0/18")
        .await?
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    stack.aws_proxy.hold_instances(instances.iter().cloned());
    let ids = crate::bench::reads::seed_nodes(stack, count, "waiting_for_instance").await?;
    let pool = stack.pool().await?;
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "UPDATE nodes SET instance_id = n.instance, applied_instance_type = NULL, \
         applied_volume_gb = NULL, next_run_at = now() + interval '1 second' \
         FROM unnest($1::uuid[], $2::text[]) AS n(id, instance) WHERE nodes.id = n.id",
    )
    .bind(&ids)
    .bind(&instances)
    .execute(&mut *tx)
    .await?;
    // As a look again of a step that just began enqueues it.
    hive_jobs::store::queue::enqueue_as(
        &mut tx,
        &ids,
        std::time::Duration::from_secs(1),
        hive_jobs::store::queue::look_again_priority(std::time::Duration::ZERO),
    )
    .await?;
    tx.commit().await?;
    pool.close().await;
    Ok(ids)
}
