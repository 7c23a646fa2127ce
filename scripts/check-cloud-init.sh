#!/usr/bin/env bash
# Renders the node's user-data for sample nodes and checks each: `cloud-init schema` accepts
# it, shellcheck passes every script in it, it is under EC2's 16 KiB, and it holds no token.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian's python has PyYAML (cloud-init needs it); fall back to the one on PATH.
py=/usr/bin/python3
[ -x "$py" ] || py=python3
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# Built by `cargo build --workspace --all-targets` (running it through `cargo run -p` would
# rebuild the AWS SDK with another feature set).
[ -x target/debug/examples/render-user-data ] || cargo build -q --workspace --all-targets --locked
target/debug/examples/render-user-data "$out"

for ud in "$out"/*.yaml; do
  cloud-init schema -c "$ud" >/dev/null || { echo "cloud-init schema rejects $ud"; cloud-init schema -c "$ud"; exit 1; }
  size=$(wc -c < "$ud")
  [ "$size" -le 16384 ] || { echo "$ud is $size bytes, over 16 KiB"; exit 1; }
  if grep -Eq 'eyJ[A-Za-z0-9_-]{20,}|SAMPLE-TUNNEL-TOKEN' "$ud"; then
    echo "$ud holds a token"; exit 1
  fi
  # Every script it writes, through shellcheck.
  "$py" - "$ud" "$out" <<'PY'
import sys, yaml, os
ud, out = sys.argv[1], sys.argv[2]
doc = yaml.safe_load(open(ud))
for i, f in enumerate(doc.get("write_files", [])):
    if f["content"].startswith("#!/bin/bash"):
        path = os.path.join(out, "script-%s-%d.sh" % (os.path.basename(ud), i))
        open(path, "w").write(f["content"])
PY
done
shellcheck --severity=style "$out"/script-*.sh
rendered=("$out"/*.yaml)
echo "cloud-init: ${#rendered[@]} rendered user-data files valid, scripts shellcheck-clean"
