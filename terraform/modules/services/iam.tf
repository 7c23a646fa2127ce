data "aws_caller_identity" "current" {}

locals {
  account = data.aws_caller_identity.current.account_id
  ec2_arn = "arn:aws:ec2:${var.region}:${local.account}"
  assume_ecs_tasks = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "ecs-tasks.amazonaws.com" }
      Action    = "sts:AssumeRole"
    }]
  })
  app_secrets = [
    var.app_secret_arns.stripe_webhook_secret,
    var.app_secret_arns.jwt_secret,
    var.app_secret_arns.cloudflare_api_token,
    var.database_secret_arn,
  ]
}

# Lets ECS pull images, write logs and inject the services' secrets.
resource "aws_iam_role" "execution" {
  name               = "${var.name}-task-execution"
  assume_role_policy = local.assume_ecs_tasks
}

resource "aws_iam_role_policy_attachment" "execution" {
  role       = aws_iam_role.execution.name
  policy_arn = "arn:aws:iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy"
}

resource "aws_iam_role_policy" "execution_secrets" {
  name = "read-service-secrets"
  role = aws_iam_role.execution.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      { Effect = "Allow", Action = "secretsmanager:GetSecretValue", Resource = local.app_secrets },
      { Effect = "Allow", Action = "kms:Decrypt", Resource = var.kms_key_arn },
    ]
  })
}

# hive-api touches no cloud: its task role allows nothing.
resource "aws_iam_role" "api" {
  name               = "${var.name}-api"
  assume_role_policy = local.assume_ecs_tasks
}

# hive-worker: EC2 limited to instances tagged as ours, Route 53 changes to the one zone,
# Secrets Manager to the nodes' path.
resource "aws_iam_role" "worker" {
  name               = "${var.name}-worker"
  assume_role_policy = local.assume_ecs_tasks
}

resource "aws_iam_role_policy" "worker" {
  name = "provision-nodes"
  role = aws_iam_role.worker.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid      = "Describe"
        Effect   = "Allow"
        Action   = ["ec2:DescribeInstances", "ec2:DescribeImages", "ec2:DescribeInstanceStatus"]
        Resource = "*"
      },
      {
        Sid      = "LaunchOnlyTaggedNodes"
        Effect   = "Allow"
        Action   = ["ec2:RunInstances", "ec2:CreateTags"]
        Resource = ["${local.ec2_arn}:instance/*", "${local.ec2_arn}:volume/*", "${local.ec2_arn}:network-interface/*"]
        Condition = {
          StringLike = { "aws:RequestTag/hive:node-id" = "*" }
        }
      },
      {
        Sid    = "LaunchFromOurImageSubnetAndGroup"
        Effect = "Allow"
        Action = "ec2:RunInstances"
        Resource = [
          "arn:aws:ec2:${var.region}::image/${var.node_ami_id}",
          "${local.ec2_arn}:subnet/${var.node_subnet_id}",
          "${local.ec2_arn}:security-group/${var.node_security_group}",
        ]
      },
      {
        Sid       = "TagOnlyAtLaunch"
        Effect    = "Allow"
        Action    = "ec2:CreateTags"
        Resource  = "${local.ec2_arn}:*/*"
        Condition = { StringEquals = { "ec2:CreateAction" = "RunInstances" } }
      },
      {
        Sid       = "ManageOnlyOurNodes"
        Effect    = "Allow"
        Action    = ["ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances", "ec2:RebootInstances"]
        Resource  = "${local.ec2_arn}:instance/*"
        Condition = { StringLike = { "aws:ResourceTag/hive:node-id" = "*" } }
      },
      {
        Sid      = "PassOnlyTheNodeRole"
        Effect   = "Allow"
        Action   = "iam:PassRole"
        Resource = var.node_role_arn
      },
      {
        Sid      = "NodeNamesInOneZone"
        Effect   = "Allow"
        Action   = ["route53:ChangeResourceRecordSets", "route53:ListResourceRecordSets"]
        Resource = "arn:aws:route53:::hostedzone/${var.route53_zone_id}"
      },
      {
        Sid      = "Route53ChangeStatus"
        Effect   = "Allow"
        Action   = "route53:GetChange"
        Resource = "arn:aws:route53:::change/*"
      },
      {
        Sid      = "NodeSecrets"
        Effect   = "Allow"
        Action   = ["secretsmanager:CreateSecret", "secretsmanager:PutSecretValue", "secretsmanager:TagResource", "secretsmanager:DeleteSecret", "secretsmanager:DescribeSecret"]
        Resource = "arn:aws:secretsmanager:${var.region}:${local.account}:secret:hive/nodes/*"
      },
      {
        Sid      = "FindNodeSecrets"
        Effect   = "Allow"
        Action   = "secretsmanager:ListSecrets"
        Resource = "*"
      },
    ]
  })
}
