#!/usr/bin/env bash
# Every check and every test, from nothing: installs what is missing, builds once, then runs
# the formatting and lint checks, the cloud-init and terraform checks and all tests from that
# one build.
# The tests start their own Postgres clusters, moto servers and stand-ins on loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
# A one-off build needs no incremental state (it only costs disk).
if [ "${CI:-}" = "true" ]; then export CARGO_INCREMENTAL=0; fi
cargo fmt --all -- --check
cargo build --workspace --all-targets --locked
cargo clippy --workspace --all-targets --locked -- -D warnings
scripts/check-cloud-init.sh
scripts/check-terraform.sh

log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
passed=$(grep -E '^test result:' "$log" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -E '^test result:' "$log" | grep -Eo '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
echo "tests: ${passed} passed, ${failed} failed"

# The benchmark command in its short mode, on this build (a second a scenario): it must keep
# working; its figures are not asserted (scripts/bench.sh measures, on a release build).
set +e
target/debug/hive-bench --short --statements --json target/bench-short.json
bench_status=$?
set -e
# Every scenario printed its figures, each scenario at least one beside its ceiling.
if [ "$bench_status" -eq 0 ]; then
  python3 scripts/check-bench-json.py target/bench-short.json || bench_status=1
fi
echo "benchmarks (short): exit ${bench_status}"
if [ "$status" -eq 0 ]; then status=$bench_status; fi
exit "$status"
