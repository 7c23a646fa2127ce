# Each output is a setting of hive-worker (or hive-api), named after it.

output "AWS_REGION" {
  description = "Region of the stack and its nodes."
  value       = var.region
}

output "HIVE_ROUTE53_ZONE_ID" {
  description = "Hosted zone of the node domain."
  value       = module.dns.zone_id
}

output "route53_name_servers" {
  description = "Delegate node_domain to these name servers at its parent."
  value       = module.dns.name_servers
}

output "HIVE_SUBNET_ID" {
  description = "Private subnet nodes are launched in (outbound only, through NAT)."
  value       = module.network.private_subnet_ids[0]
}

output "HIVE_SECURITY_GROUP_ID" {
  description = "Node security group: no inbound rule."
  value       = module.node.security_group_id
}

output "HIVE_INSTANCE_PROFILE" {
  description = "Instance profile of the nodes (reads only its own tunnel-token secret)."
  value       = module.node.instance_profile_name
}

output "HIVE_AMI_ID" {
  description = "Image of the nodes."
  value       = var.node_ami_id
}

output "database_endpoint" {
  description = "Postgres endpoint; DATABASE_URL is built from it and the RDS-managed secret."
  value       = module.database.endpoint
}

output "database_secret_arn" {
  description = "Secrets Manager secret holding the database credentials (managed by RDS)."
  value       = module.database.master_secret_arn
}

output "api_url" {
  description = "Public address of hive-api (point Stripe's webhook at <api_url>/webhooks/stripe)."
  value       = module.services.api_dns_name
}
