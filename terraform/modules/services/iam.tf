data "aws_caller_identity" "current" {}

locals {
  account = data.aws_caller_identity.current.account_id
  # What the worker may launch from, in each region it serves.
  image_arns = [for name, r in var.regions : "arn:aws:ec2:${name}::image/${r.ami_id}"]
  subnet_arns = flatten([
    for name, r in var.regions : [for id in r.subnet_ids : "arn:aws:ec2:${name}:${local.account}:subnet/${id}"]
  ])
  security_group_arns = [
    for name, r in var.regions : "arn:aws:ec2:${name}:${local.account}:security-group/${r.security_group_id}"
  ]
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

# hive-worker: EC2 limited to instances tagged as ours, in every region it serves; Route 53
# changes to the one zone; Secrets Manager to the nodes' path.
resource "aws_iam_role" "worker" {
  name               = "${var.name}-worker"
  assume_role_policy = local.assume_ecs_tasks
}

# The worker's whole permission, one action per call its code makes (jobs/src/cloud/), and
# nothing more. This document is the contract: the tests load the same file, put sample values
# in its placeholders and run the worker under it, so a call the code adds fails there until it
# is allowed here. Its placeholders are plain `${name}`s (no other template syntax): the lists
# are JSON arrays of ARNs, the rest go inside JSON strings.
resource "aws_iam_role_policy" "worker" {
  name = "provision-nodes"
  role = aws_iam_role.worker.id
  policy = templatefile("${path.module}/worker-policy.json.tftpl", {
    account             = local.account
    route53_zone_id     = var.route53_zone_id
    node_role_arn       = var.node_role_arn
    image_arns          = jsonencode(local.image_arns)
    subnet_arns         = jsonencode(local.subnet_arns)
    security_group_arns = jsonencode(local.security_group_arns)
  })
}
