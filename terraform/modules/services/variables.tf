variable "name" {
  description = "Name prefix."
  type        = string
}

variable "region" {
  description = "Region of the stack."
  type        = string
}

variable "vpc_id" {
  description = "VPC of the services."
  type        = string
}

variable "vpc_cidr" {
  description = "CIDR of the VPC (what may scrape the tasks' metrics)."
  type        = string
}

variable "private_subnet_ids" {
  description = "Subnets of the tasks."
  type        = list(string)
}

variable "public_subnet_ids" {
  description = "Subnets of the api's load balancer."
  type        = list(string)
}

variable "kms_key_arn" {
  description = "Key that encrypts the log groups."
  type        = string
}

variable "api_image" {
  description = "hive-api image."
  type        = string
}

variable "worker_image" {
  description = "hive-worker image."
  type        = string
}

variable "api_count" {
  description = "hive-api tasks."
  type        = number
}

variable "worker_count" {
  description = "hive-worker tasks."
  type        = number
}

variable "api_certificate_arn" {
  description = "ACM certificate for the load balancer."
  type        = string
}

variable "app_secret_arns" {
  description = "Secrets of the apps: stripe_webhook_secret, jwt_secret, cloudflare_api_token."
  type = object({
    stripe_webhook_secret = string
    jwt_secret            = string
    cloudflare_api_token  = string
  })
}

variable "database_secret_arn" {
  description = "RDS-managed secret with the database credentials."
  type        = string
}

variable "database_endpoint" {
  description = "host:port of Postgres."
  type        = string
}

variable "database_sg_id" {
  description = "Security group of the database (the tasks get access to it)."
  type        = string
}

variable "node_domain" {
  description = "The node domain."
  type        = string
}

variable "app_origins" {
  description = "Origins checkout and portal return URLs must be on (HIVE_RETURN_URL_ORIGINS)."
  type        = list(string)
}

variable "regions" {
  description = "Regions the worker launches nodes in: name => its node subnets (one per zone, tried in order), node security group and image."
  type = map(object({
    subnet_ids        = list(string)
    security_group_id = string
    ami_id            = string
  }))
}

variable "node_instance_profile" {
  description = "Node instance profile."
  type        = string
}

variable "node_role_arn" {
  description = "Node role, which the worker passes to instances."
  type        = string
}

variable "route53_zone_id" {
  description = "Zone of the node names."
  type        = string
}

variable "cloudflare_account_id" {
  description = "Cloudflare account."
  type        = string
}

variable "cloudflare_zone_id" {
  description = "Cloudflare zone."
  type        = string
}
