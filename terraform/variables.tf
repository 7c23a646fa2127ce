variable "name" {
  description = "Name prefix of every resource (one stack per account and region)."
  type        = string
  default     = "hive"
}

variable "region" {
  description = "AWS region of the stack; nodes are launched here and in `regions` (the services' AWS_REGION)."
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

variable "app_origins" {
  description = "Origins of the customer's app (https://app.example.com): where checkout and portal may send a customer back to (HIVE_RETURN_URL_ORIGINS)."
  type        = list(string)
  default     = []
}

variable "node_ami_id" {
  description = "arm64 Debian 12 image the nodes of the stack's own region boot (unless `regions` names that region)."
  type        = string
}

variable "regions" {
  description = <<-EOT
    Regions the worker launches nodes in besides the stack's own, by name: the private subnets
    of the nodes (one per availability zone, tried in order), their no-inbound security group
    and their arm64 Debian 12 image there. Their network is made outside this stack; the node
    instance profile and the worker are this stack's. The stack's own region is served whether
    named here or not: when not, with this stack's private subnets, node security group and
    node_ami_id.
  EOT
  type = map(object({
    subnet_ids        = list(string)
    security_group_id = string
    ami_id            = string
  }))
  default = {}
  validation {
    condition = alltrue([
      for name, r in var.regions : (
        can(regex("^[a-z0-9-]+$", name))
        && length(r.subnet_ids) > 0
        && alltrue([for id in r.subnet_ids : startswith(id, "subnet-")])
        && startswith(r.security_group_id, "sg-")
        && startswith(r.ami_id, "ami-")
      )
    ])
    error_message = "Each region: a region name (eu-west-1), at least one subnet (subnet-...), a security group (sg-...) and an image (ami-...)."
  }
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
