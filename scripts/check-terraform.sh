#!/usr/bin/env bash
# Static checks of terraform/: formatting (where terraform is installed) and checkov with zero
# failed checks. Every skipped check is marked in its module with `#checkov:skip=ID:reason`.
# (terraform validate needs the AWS provider from the registry, which CI cannot reach.)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/tools.env
. scripts/tools.env

if command -v terraform >/dev/null 2>&1; then
  terraform fmt -check -recursive -diff terraform
  echo "terraform fmt: clean"
else
  echo "terraform fmt: skipped (terraform is not installed)"
fi
# --skip-download: no calls to Prisma Cloud for guidelines; the checks themselves are local.
"${CHECKOV_VENV}/bin/checkov" -d terraform --framework terraform --quiet --compact --skip-download

# checkov cannot render templatefile(), so above it never sees the worker's policy. Render the
# template here with sample values (its placeholders are plain `${name}`s), check it is JSON, and
# scan it as the policy string of a stand-in aws_iam_role_policy in a directory of its own. That
# file is HCL, not .tf.json: `--framework terraform` skips .tf.json, and `terraform_json` runs
# none of the IAM checks (CKV_AWS_286..290, CKV_AWS_355).
rendered="$(mktemp -d)"
trap 'rm -rf "${rendered}"' EXIT
python3 - terraform/modules/services/worker-policy.json.tftpl "${rendered}/main.tf" <<'PY'
import json
import sys

template, out = sys.argv[1], sys.argv[2]
account = "123456789012"
values = {
    "account": account,
    "route53_zone_id": "Z0123456789ABC",
    "node_role_arn": f"arn:aws:iam::{account}:role/hive-node",
    # The lists go in unquoted, as jsonencode() output.
    "image_arns": json.dumps(["arn:aws:ec2:eu-west-1::image/ami-0123456789abcdef0"]),
    "subnet_arns": json.dumps([f"arn:aws:ec2:eu-west-1:{account}:subnet/subnet-0123456789abcdef0"]),
    "security_group_arns": json.dumps(
        [f"arn:aws:ec2:eu-west-1:{account}:security-group/sg-0123456789abcdef0"]
    ),
}
with open(template, encoding="utf-8") as f:
    policy = f.read()
for name, value in values.items():
    policy = policy.replace("${" + name + "}", value)
# A placeholder added to the template but not here would otherwise pass as literal text (and
# HCL would read it as an interpolation in the string below).
if "${" in policy or "%{" in policy:
    sys.exit(f"{template}: template syntax left after rendering; give it a sample value here")
try:
    json.loads(policy)
except json.JSONDecodeError as e:
    sys.exit(f"{template}: not JSON once rendered: {e}")
# A JSON string literal (ASCII, escapes \" \\ \n \uXXXX) is also a valid HCL quoted string.
with open(out, "w", encoding="utf-8") as f:
    f.write(
        'resource "aws_iam_role_policy" "worker_rendered" {\n'
        '  name   = "provision-nodes"\n'
        '  role   = "hive-worker"\n'
        f"  policy = {json.dumps(policy)}\n"
        "}\n"
    )
PY
echo "checkov: worker-policy.json.tftpl, rendered with sample values"
# checkov passes a directory it finds nothing to check in, so also require that checks ran.
if ! scan="$("${CHECKOV_VENV}/bin/checkov" -d "${rendered}" --framework terraform --quiet --compact --skip-download)"; then
  printf '%s\n' "${scan}"
  exit 1
fi
printf '%s\n' "${scan}"
if ! grep -q 'Passed checks: [1-9]' <<<"${scan}"; then
  echo "checkov ran no checks on the rendered worker policy" >&2
  exit 1
fi
