# hive-api and hive-worker on ECS Fargate in the private subnets; the api behind an HTTPS load
# balancer (Stripe's webhooks and the app reach it), the worker reachable by nothing.

resource "aws_ecs_cluster" "this" {
  name = var.name
  setting {
    name  = "containerInsights"
    value = "enabled"
  }
}

resource "aws_cloudwatch_log_group" "service" {
  for_each          = toset(["api", "worker"])
  name              = "/${var.name}/${each.key}"
  retention_in_days = 365
  kms_key_id        = var.kms_key_arn
}

locals {
  common_env = [
    { name = "DATABASE_URL", value = "postgres://hive@${var.database_endpoint}/hive?sslmode=require" },
    { name = "AWS_REGION", value = var.region },
    { name = "HIVE_NODE_DOMAIN", value = var.node_domain },
    { name = "HIVE_LOG_FORMAT", value = "json" },
  ]
  # The database password goes into PGPASSWORD, which the binaries' Postgres driver reads.
  db_password = [{ name = "PGPASSWORD", valueFrom = "${var.database_secret_arn}:password::" }]
  container = {
    readonlyRootFilesystem = true
    privileged             = false
    user                   = "65534"
    essential              = true
  }
}

resource "aws_ecs_task_definition" "api" {
  family                   = "${var.name}-api"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = 512
  memory                   = 1024
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = aws_iam_role.api.arn
  container_definitions = jsonencode([merge(local.container, {
    name         = "hive-api"
    image        = var.api_image
    portMappings = [{ containerPort = 8080, protocol = "tcp" }]
    environment  = concat(local.common_env, [{ name = "HIVE_API_ADDR", value = "0.0.0.0:8080" }])
    secrets = concat(local.db_password, [
      { name = "STRIPE_WEBHOOK_SECRET", valueFrom = var.app_secret_arns.stripe_webhook_secret },
      { name = "HIVE_JWT_SECRET", valueFrom = var.app_secret_arns.jwt_secret },
    ])
    logConfiguration = {
      logDriver = "awslogs"
      options = {
        awslogs-group         = aws_cloudwatch_log_group.service["api"].name
        awslogs-region        = var.region
        awslogs-stream-prefix = "api"
      }
    }
  })])
}

resource "aws_ecs_task_definition" "worker" {
  family                   = "${var.name}-worker"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = 512
  memory                   = 1024
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = aws_iam_role.worker.arn
  container_definitions = jsonencode([merge(local.container, {
    name        = "hive-worker"
    image       = var.worker_image
    stopTimeout = 30
    environment = concat(local.common_env, [
      { name = "CLOUDFLARE_ACCOUNT_ID", value = var.cloudflare_account_id },
      { name = "CLOUDFLARE_ZONE_ID", value = var.cloudflare_zone_id },
      { name = "HIVE_ROUTE53_ZONE_ID", value = var.route53_zone_id },
      { name = "HIVE_AMI_ID", value = var.node_ami_id },
      { name = "HIVE_SUBNET_ID", value = var.node_subnet_id },
      { name = "HIVE_SECURITY_GROUP_ID", value = var.node_security_group },
      { name = "HIVE_INSTANCE_PROFILE", value = var.node_instance_profile },
    ])
    secrets = concat(local.db_password, [
      { name = "CLOUDFLARE_API_TOKEN", valueFrom = var.app_secret_arns.cloudflare_api_token },
    ])
    logConfiguration = {
      logDriver = "awslogs"
      options = {
        awslogs-group         = aws_cloudwatch_log_group.service["worker"].name
        awslogs-region        = var.region
        awslogs-stream-prefix = "worker"
      }
    }
  })])
}

resource "aws_security_group" "api" {
  name        = "${var.name}-api"
  description = "hive-api tasks: HTTP from the load balancer only"
  vpc_id      = var.vpc_id
}

resource "aws_security_group" "worker" {
  name        = "${var.name}-worker"
  description = "hive-worker tasks: no inbound"
  vpc_id      = var.vpc_id
}

resource "aws_security_group" "lb" {
  name        = "${var.name}-api-lb"
  description = "The api's load balancer: HTTPS from anywhere (Stripe, the app)"
  vpc_id      = var.vpc_id
}

resource "aws_vpc_security_group_ingress_rule" "lb_https" {
  security_group_id = aws_security_group.lb.id
  description       = "HTTPS from the internet"
  cidr_ipv4         = "0.0.0.0/0"
  from_port         = 443
  to_port           = 443
  ip_protocol       = "tcp"
}

resource "aws_vpc_security_group_egress_rule" "lb_to_api" {
  security_group_id            = aws_security_group.lb.id
  description                  = "to the api tasks"
  referenced_security_group_id = aws_security_group.api.id
  from_port                    = 8080
  to_port                      = 8080
  ip_protocol                  = "tcp"
}

resource "aws_vpc_security_group_ingress_rule" "api_from_lb" {
  security_group_id            = aws_security_group.api.id
  description                  = "from the load balancer"
  referenced_security_group_id = aws_security_group.lb.id
  from_port                    = 8080
  to_port                      = 8080
  ip_protocol                  = "tcp"
}

resource "aws_vpc_security_group_ingress_rule" "db_from_tasks" {
  for_each                     = { api = aws_security_group.api.id, worker = aws_security_group.worker.id }
  security_group_id            = var.database_sg_id
  description                  = "Postgres from hive-${each.key}"
  referenced_security_group_id = each.value
  from_port                    = 5432
  to_port                      = 5432
  ip_protocol                  = "tcp"
}

resource "aws_vpc_security_group_egress_rule" "tasks_out" {
  for_each          = { api = aws_security_group.api.id, worker = aws_security_group.worker.id }
  security_group_id = each.value
  description       = "HTTPS out (AWS APIs, Cloudflare) and Postgres inside the VPC"
  cidr_ipv4         = "0.0.0.0/0"
  from_port         = 443
  to_port           = 443
  ip_protocol       = "tcp"
}

resource "aws_vpc_security_group_egress_rule" "tasks_to_db" {
  for_each                     = { api = aws_security_group.api.id, worker = aws_security_group.worker.id }
  security_group_id            = each.value
  description                  = "Postgres"
  referenced_security_group_id = var.database_sg_id
  from_port                    = 5432
  to_port                      = 5432
  ip_protocol                  = "tcp"
}

resource "aws_lb" "api" {
  #checkov:skip=CKV2_AWS_28:A WAF in front of the api is the operator's choice; webhooks are verified by signature and app calls by JWT.
  #checkov:skip=CKV_AWS_91:Access logs need an S3 bucket whose retention is the operator's policy; request logs are in the api's own log group.
  name                       = "${var.name}-api"
  load_balancer_type         = "application"
  internal                   = false
  subnets                    = var.public_subnet_ids
  security_groups            = [aws_security_group.lb.id]
  drop_invalid_header_fields = true
  enable_deletion_protection = true
}

resource "aws_lb_target_group" "api" {
  name        = "${var.name}-api"
  port        = 8080
  protocol    = "HTTP"
  target_type = "ip"
  vpc_id      = var.vpc_id
  health_check {
    path    = "/healthz"
    matcher = "200"
  }
}

resource "aws_lb_listener" "https" {
  load_balancer_arn = aws_lb.api.arn
  port              = 443
  protocol          = "HTTPS"
  ssl_policy        = "ELBSecurityPolicy-TLS13-1-2-2021-06"
  certificate_arn   = var.api_certificate_arn
  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.api.arn
  }
}

resource "aws_ecs_service" "api" {
  name            = "hive-api"
  cluster         = aws_ecs_cluster.this.id
  task_definition = aws_ecs_task_definition.api.arn
  desired_count   = var.api_count
  launch_type     = "FARGATE"
  network_configuration {
    subnets          = var.private_subnet_ids
    security_groups  = [aws_security_group.api.id]
    assign_public_ip = false
  }
  load_balancer {
    target_group_arn = aws_lb_target_group.api.arn
    container_name   = "hive-api"
    container_port   = 8080
  }
  depends_on = [aws_lb_listener.https]
}

resource "aws_ecs_service" "worker" {
  name            = "hive-worker"
  cluster         = aws_ecs_cluster.this.id
  task_definition = aws_ecs_task_definition.worker.arn
  desired_count   = var.worker_count
  launch_type     = "FARGATE"
  network_configuration {
    subnets          = var.private_subnet_ids
    security_groups  = [aws_security_group.worker.id]
    assign_public_ip = false
  }
}

output "api_dns_name" {
  description = "The load balancer's name (point a CNAME of the api's domain at it)."
  value       = "https://${aws_lb.api.dns_name}"
}
