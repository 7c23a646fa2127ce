# The whole footprint of Hive Provisioner in one AWS account: network, node identity, DNS,
# database, and the api and worker services.

data "aws_caller_identity" "current" {}

resource "aws_kms_key" "hive" {
  description             = "${var.name}: logs, database, secrets"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms.json
}

data "aws_iam_policy_document" "kms" {
  #checkov:skip=CKV_AWS_111:A key policy's resource is always "*" (the key itself); the account root delegates to IAM.
  #checkov:skip=CKV_AWS_356:A key policy's resource is always "*" (the key itself).
  #checkov:skip=CKV_AWS_109:A key policy's resource is always "*" (the key itself); the account root delegates to IAM.
  statement {
    sid       = "AccountAdministers"
    actions   = ["kms:*"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = ["arn:aws:iam::${data.aws_caller_identity.current.account_id}:root"]
    }
  }
  statement {
    sid       = "CloudWatchLogsEncrypt"
    actions   = ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
    resources = ["*"]
    principals {
      type        = "Service"
      identifiers = ["logs.${var.region}.amazonaws.com"]
    }
  }
}

# Every region the worker launches nodes in. The stack's own region is always one: unless
# var.regions names it, with this stack's private subnets, node security group and image.
locals {
  regions = merge({
    (var.region) = {
      subnet_ids        = module.network.private_subnet_ids
      security_group_id = module.node.security_group_id
      ami_id            = var.node_ami_id
    }
  }, var.regions)
}

module "network" {
  source      = "./modules/network"
  name        = var.name
  cidr        = var.vpc_cidr
  kms_key_arn = aws_kms_key.hive.arn
}

module "node" {
  source = "./modules/node"
  name   = var.name
  vpc_id = module.network.vpc_id
}

module "dns" {
  source = "./modules/dns"
  name   = var.name
  domain = var.node_domain
  providers = {
    aws           = aws
    aws.us_east_1 = aws.us_east_1
  }
}

module "database" {
  source      = "./modules/database"
  name        = var.name
  vpc_id      = module.network.vpc_id
  subnet_ids  = module.network.private_subnet_ids
  kms_key_arn = aws_kms_key.hive.arn
}

module "services" {
  source                = "./modules/services"
  name                  = var.name
  region                = var.region
  vpc_id                = module.network.vpc_id
  vpc_cidr              = var.vpc_cidr
  private_subnet_ids    = module.network.private_subnet_ids
  public_subnet_ids     = module.network.public_subnet_ids
  kms_key_arn           = aws_kms_key.hive.arn
  api_image             = var.api_image
  worker_image          = var.worker_image
  api_count             = var.api_count
  worker_count          = var.worker_count
  api_certificate_arn   = var.api_certificate_arn
  app_secret_arns       = var.app_secret_arns
  database_secret_arn   = module.database.master_secret_arn
  database_endpoint     = module.database.endpoint
  database_sg_id        = module.database.security_group_id
  node_domain           = var.node_domain
  app_origins           = var.app_origins
  regions               = local.regions
  node_instance_profile = module.node.instance_profile_name
  node_role_arn         = module.node.role_arn
  route53_zone_id       = module.dns.zone_id
  cloudflare_account_id = var.cloudflare_account_id
  cloudflare_zone_id    = var.cloudflare_zone_id
}
