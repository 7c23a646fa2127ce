# What a node is allowed: no inbound traffic at all (cloudflared dials out), and to read one
# secret, its own tunnel token: the secret's `hive:instance-arn` tag must name the calling
# instance, which the worker sets once the instance exists (attribute-based access). The role
# and its instance profile are global: nodes of every region the worker serves use them, and
# read their secret in their own region.

variable "name" {
  description = "Name prefix."
  type        = string
}

variable "vpc_id" {
  description = "VPC of the nodes."
  type        = string
}

data "aws_caller_identity" "current" {}

resource "aws_security_group" "node" {
  #checkov:skip=CKV2_AWS_5:The worker attaches this group to every node it launches, at run time, not in terraform.
  name        = "${var.name}-nodes"
  description = "Hive nodes: no inbound; HTTPS and DNS out"
  vpc_id      = var.vpc_id

  egress {
    description = "HTTPS to Cloudflare, AWS APIs and package mirrors"
    from_port   = 443
    to_port     = 443
    protocol    = "tcp"
    cidr_blocks = ["0.0.0.0/0"]
  }
  egress {
    description = "cloudflared's QUIC transport to Cloudflare's edge"
    from_port   = 7844
    to_port     = 7844
    protocol    = "udp"
    cidr_blocks = ["0.0.0.0/0"]
  }
  egress {
    description = "cloudflared's HTTP/2 fallback to Cloudflare's edge"
    from_port   = 7844
    to_port     = 7844
    protocol    = "tcp"
    cidr_blocks = ["0.0.0.0/0"]
  }
  egress {
    description = "Debian package mirrors over HTTP (signed packages)"
    from_port   = 80
    to_port     = 80
    protocol    = "tcp"
    cidr_blocks = ["0.0.0.0/0"]
  }
}

resource "aws_iam_role" "node" {
  name = "${var.name}-node"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "ec2.amazonaws.com" }
      Action    = "sts:AssumeRole"
    }]
  })
}

resource "aws_iam_role_policy" "own_secret" {
  name = "read-own-tunnel-token"
  role = aws_iam_role.node.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Sid      = "ReadOwnTunnelToken"
      Effect   = "Allow"
      Action   = "secretsmanager:GetSecretValue"
      Resource = "arn:aws:secretsmanager:*:${data.aws_caller_identity.current.account_id}:secret:hive/nodes/*"
      Condition = {
        StringEquals = {
          "secretsmanager:ResourceTag/hive:instance-arn" = "$${ec2:SourceInstanceARN}"
        }
      }
    }]
  })
}

resource "aws_iam_instance_profile" "node" {
  name = "${var.name}-node"
  role = aws_iam_role.node.name
}

output "security_group_id" {
  description = "Node security group (no inbound rule)."
  value       = aws_security_group.node.id
}

output "instance_profile_name" {
  description = "Node instance profile."
  value       = aws_iam_instance_profile.node.name
}

output "role_arn" {
  description = "Node role (the worker may pass it to instances)."
  value       = aws_iam_role.node.arn
}
