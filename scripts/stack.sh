#!/usr/bin/env bash
# The local stack: a private Postgres cluster, moto as AWS, the Cloudflare stand-in, hive-api
# and hive-worker, all on this machine with no cloud account. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo build --workspace --bins --locked
exec target/debug/hive-stack up
