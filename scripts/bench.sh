#!/usr/bin/env bash
# The benchmarks: a release build of the binaries, then every scenario of hive-bench against
# the local stack it starts (a private Postgres cluster, moto, the stand-ins), each figure
# printed beside its ceiling and written as JSON (target/bench.json). Arguments go to
# hive-bench: `--only ingest,reads`, `--short`, `--json PATH`.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo build --release --locked -p hive-api -p hive-worker -p hivectl -p hive-tests --bins
exec target/release/hive-bench "$@"
