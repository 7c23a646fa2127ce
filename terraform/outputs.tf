# Each output in capitals is a setting of hive-worker (or hive-api), named after it. The
# one-region shorthand (HIVE_SUBNET_ID, HIVE_SECURITY_GROUP_ID, HIVE_AMI_ID,
# HIVE_INSTANCE_PROFILE) is the stack's own region only; hive_config_toml holds every region.

output "AWS_REGION" {
  description = "Region of the stack (and of its own nodes)."
  value       = var.region
}

output "hive_config_toml" {
  description = "The configuration file the services read (write it to a file, point HIVE_CONFIG_FILE at it): one [regions.<name>] table per region nodes are launched in."
  value       = module.services.config_toml
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
  description = "Private subnets nodes of the stack's region are launched in, one per zone (outbound only, through NAT)."
  value       = join(",", local.regions[var.region].subnet_ids)
}

output "HIVE_SECURITY_GROUP_ID" {
  description = "Node security group of the stack's region: no inbound rule."
  value       = local.regions[var.region].security_group_id
}

output "HIVE_INSTANCE_PROFILE" {
  description = "Instance profile of the nodes (reads only its own tunnel-token secret)."
  value       = module.node.instance_profile_name
}

output "HIVE_AMI_ID" {
  description = "Image of the nodes of the stack's region."
  value       = local.regions[var.region].ami_id
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
