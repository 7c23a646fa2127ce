# The node domain's hosted zone. Route 53 stays authoritative; the domain is a partial (CNAME)
# zone at Cloudflare, and each node's name points at <name>.cdn.cloudflare.net.

variable "name" {
  description = "Name prefix."
  type        = string
}

variable "domain" {
  description = "The node domain."
  type        = string
}

terraform {
  required_providers {
    aws = {
      source                = "hashicorp/aws"
      configuration_aliases = [aws.us_east_1]
    }
  }
}

resource "aws_route53_zone" "nodes" {
  #checkov:skip=CKV2_AWS_38:DNSSEC signing needs a KMS key in us-east-1 and a DS record at the parent, both outside this stack; the names only point at Cloudflare, which terminates TLS.
  name    = var.domain
  comment = "${var.name} nodes"
}

# Route 53 writes query logs only to CloudWatch Logs in us-east-1, encrypted with a key there.
data "aws_caller_identity" "current" {}

resource "aws_kms_key" "query_logs" {
  provider                = aws.us_east_1
  description             = "${var.name}: Route 53 query logs"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid       = "AccountAdministers"
        Effect    = "Allow"
        Principal = { AWS = "arn:aws:iam::${data.aws_caller_identity.current.account_id}:root" }
        Action    = "kms:*"
        Resource  = "*"
      },
      {
        Sid       = "CloudWatchLogsEncrypt"
        Effect    = "Allow"
        Principal = { Service = "logs.us-east-1.amazonaws.com" }
        Action    = ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
        Resource  = "*"
      },
    ]
  })
}

resource "aws_cloudwatch_log_group" "queries" {
  provider          = aws.us_east_1
  name              = "/aws/route53/${var.domain}"
  retention_in_days = 365
  kms_key_id        = aws_kms_key.query_logs.arn
}

resource "aws_cloudwatch_log_resource_policy" "route53" {
  provider    = aws.us_east_1
  policy_name = "${var.name}-route53-query-logs"
  policy_document = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "route53.amazonaws.com" }
      Action    = ["logs:CreateLogStream", "logs:PutLogEvents"]
      Resource  = "${aws_cloudwatch_log_group.queries.arn}:*"
    }]
  })
}

resource "aws_route53_query_log" "nodes" {
  zone_id                  = aws_route53_zone.nodes.zone_id
  cloudwatch_log_group_arn = aws_cloudwatch_log_group.queries.arn
  depends_on               = [aws_cloudwatch_log_resource_policy.route53]
}

output "zone_id" {
  description = "Hosted zone id."
  value       = aws_route53_zone.nodes.zone_id
}

output "zone_arn" {
  description = "Hosted zone ARN."
  value       = aws_route53_zone.nodes.arn
}

output "name_servers" {
  description = "Name servers to delegate the domain to."
  value       = aws_route53_zone.nodes.name_servers
}
