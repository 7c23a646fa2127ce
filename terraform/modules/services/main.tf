# hive-api and hive-worker on ECS Fargate in the private subnets; the api behind an HTTPS load
# balancer (Stripe's webhooks and the app reach it), the worker reachable by nothing but a
# metrics scraper inside the VPC.

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
  # Prometheus's `GET /metrics` of both binaries, on a port of its own: the load balancer's
  # target group and listener forward only to 8080 (and its security group may reach only
  # 8080), and the tasks' groups admit this port from inside the VPC only (a scraper there).
  metrics_port = 9090
  # The regions (and nothing else) of HIVE_CONFIG_FILE. The binaries read the regions from a
  # file only (jobs/src/config.rs: no setting takes the file's text), so each task writes it
  # on a volume of its own before its service starts; see `write_config`.
  config_toml = templatefile("${path.module}/hive-config.toml.tftpl", {
    regions          = var.regions
    instance_profile = var.node_instance_profile
  })
  config_dir = "/etc/hive"
  common_env = [
    { name = "DATABASE_URL", value = "postgres://hive@${var.database_endpoint}/hive?sslmode=require" },
    # The SDK's default region; the api's default region of a checkout naming none.
    { name = "AWS_REGION", value = var.region },
    { name = "HIVE_NODE_DOMAIN", value = var.node_domain },
    { name = "HIVE_LOG_FORMAT", value = "json" },
    { name = "HIVE_CONFIG_FILE", value = "${local.config_dir}/hive.toml" },
    { name = "HIVE_METRICS_ADDR", value = "0.0.0.0:${local.metrics_port}" },
  ]
  # The database password goes into PGPASSWORD, which the binaries' Postgres driver reads.
  db_password = [{ name = "PGPASSWORD", valueFrom = "${var.database_secret_arn}:password::" }]
  container = {
    readonlyRootFilesystem = true
    privileged             = false
    user                   = "65534"
    essential              = true
  }
  # Before the service's container: writes the configuration file onto the task's volume, then
  # exits (the service starts only once it succeeded). It runs as root because Fargate makes a
  # task volume root's, mode 0755, and the services run as 65534; it keeps no capability, the
  # root filesystem stays read-only, and it runs only printf, from the service's own image.
  write_config = merge(local.container, {
    name        = "write-config"
    essential   = false
    user        = "0"
    entryPoint  = ["/bin/sh", "-c"]
    command     = ["printf '%s' \"$HIVE_CONFIG_TOML\" > ${local.config_dir}/hive.toml"]
    environment = [{ name = "HIVE_CONFIG_TOML", value = local.config_toml }]
    mountPoints = [{ sourceVolume = "config", containerPath = local.config_dir, readOnly = false }]
    linuxParameters = {
      capabilities = { drop = ["ALL"] }
    }
  })
  write_config_logs = {
    for service in ["api", "worker"] : service => {
      logDriver = "awslogs"
      options = {
        awslogs-group         = aws_cloudwatch_log_group.service[service].name
        awslogs-region        = var.region
        awslogs-stream-prefix = "${service}-config"
      }
    }
  }
  read_config = {
    dependsOn   = [{ containerName = "write-config", condition = "SUCCESS" }]
    mountPoints = [{ sourceVolume = "config", containerPath = local.config_dir, readOnly = true }]
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
  volume {
    name = "config"
  }
  container_definitions = jsonencode([
    merge(local.write_config, { image = var.api_image, logConfiguration = local.write_config_logs["api"] }),
    merge(local.container, local.read_config, {
      name         = "hive-api"
      image        = var.api_image
      portMappings = [{ containerPort = 8080, protocol = "tcp" }]
      environment = concat(local.common_env, [
        { name = "HIVE_API_ADDR", value = "0.0.0.0:8080" },
        # The load balancer appends the address it saw to X-Forwarded-For (xff "append" below),
        # and the api takes that header's last entry, so a client's own entries do not count.
        { name = "HIVE_CLIENT_IP_HEADER", value = "x-forwarded-for" },
        # Where Stripe may send a paying customer back to (else checkouts are refused).
        { name = "HIVE_RETURN_URL_ORIGINS", value = join(",", var.app_origins) },
      ])
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
    }),
  ])
}

resource "aws_ecs_task_definition" "worker" {
  family                   = "${var.name}-worker"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = 512
  memory                   = 1024
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = aws_iam_role.worker.arn
  volume {
    name = "config"
  }
  container_definitions = jsonencode([
    merge(local.write_config, { image = var.worker_image, logConfiguration = local.write_config_logs["worker"] }),
    merge(local.container, local.read_config, {
      name        = "hive-worker"
      image       = var.worker_image
      stopTimeout = 30
      # Its regions (image, subnets, security group, instance profile of each) are in the file.
      environment = concat(local.common_env, [
        { name = "CLOUDFLARE_ACCOUNT_ID", value = var.cloudflare_account_id },
        { name = "CLOUDFLARE_ZONE_ID", value = var.cloudflare_zone_id },
        { name = "HIVE_ROUTE53_ZONE_ID", value = var.route53_zone_id },
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
    }),
  ])
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

# Prometheus's scrape of both services, from inside the VPC only; the load balancer cannot
# reach this port (its egress is to 8080 only). The groups' descriptions predate this rule:
# changing a description replaces the group.
resource "aws_vpc_security_group_ingress_rule" "metrics_from_vpc" {
  for_each          = { api = aws_security_group.api.id, worker = aws_security_group.worker.id }
  security_group_id = each.value
  description       = "metrics of hive-${each.key}, scraped from inside the VPC"
  cidr_ipv4         = var.vpc_cidr
  from_port         = local.metrics_port
  to_port           = local.metrics_port
  ip_protocol       = "tcp"
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
  # Longer than the api's longest request: GET /api/v1/nodes/{id}/wait holds one up to 300 s
  # (api/src/wait.rs, MAX_WAIT) without sending a byte, then reads the node once more. At the
  # default 60 s the load balancer would cut every long wait.
  idle_timeout = 330
  # Appends the client's address to X-Forwarded-For (the default, pinned here): the api's
  # HIVE_CLIENT_IP_HEADER counts that last entry only.
  xff_header_processing_mode = "append"
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

output "config_toml" {
  description = "HIVE_CONFIG_FILE of the services: one [regions.<name>] table per region."
  value       = local.config_toml
}
