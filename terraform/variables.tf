variable "name" {
  description = "Name prefix of every resource (one stack per account and region)."
  type        = string
  default     = "hive"
}

variable "region" {
  description = "AWS region of the stack; nodes are launched here (the worker's AWS_REGION)."
  type        = string
}

variable "vpc_cidr" {
  description = "CIDR of the VPC; split into two public (NAT, load balancer) and two private subnets."
  type        = string
  default     = "10.40.0.0/16"
}

variable "node_domain" {
  description = "Domain under which nodes get their names (<node>.<domain>); its Route 53 zone is created here."
  type        = string
}

variable "node_ami_id" {
  description = "arm64 Debian 12 image the nodes boot (the worker's HIVE_AMI_ID)."
  type        = string
}

variable "api_image" {
  description = "Container image of hive-api."
  type        = string
}

variable "worker_image" {
  description = "Container image of hive-worker."
  type        = string
}

variable "api_certificate_arn" {
  description = "ACM certificate of the api's public name (for the load balancer's HTTPS listener)."
  type        = string
}

variable "app_secret_arns" {
  description = <<-EOT
    ARNs of Secrets Manager secrets the services read, created outside terraform so their values
    never enter the state: stripe_webhook_secret, jwt_secret, cloudflare_api_token.
  EOT
  type = object({
    stripe_webhook_secret = string
    jwt_secret            = string
    cloudflare_api_token  = string
  })
}

variable "cloudflare_account_id" {
  description = "Cloudflare account of the tunnels (the worker's CLOUDFLARE_ACCOUNT_ID)."
  type        = string
}

variable "cloudflare_zone_id" {
  description = "Cloudflare (partial, CNAME) zone of node_domain (the worker's CLOUDFLARE_ZONE_ID)."
  type        = string
}

variable "worker_count" {
  description = "hive-worker tasks; any number share the queue."
  type        = number
  default     = 2
}

variable "api_count" {
  description = "hive-api tasks."
  type        = number
  default     = 2
}
