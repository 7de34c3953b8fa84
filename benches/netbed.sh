#!/usr/bin/env bash
# shoal across emulated links: builds the test bed's delay program and the bench (dev profile:
# the engine and every dependency are optimised there, as in BENCHMARKS.md's other sections),
# runs the matrix of benches/netbed.rs (one-way delay per egress x loss x stages, each at
# several stream counts; NETBED_* variables narrow it, see that file), prints a Markdown table,
# keeps the JSON in target/netbed.json and plots aggregate tokens/s against delay into
# benches/netbed.png (matplotlib). Needs root, iproute2 and iptables.
#
#   bash benches/netbed.sh                          # the full matrix (about 15 min on 2 cores)
#   NETBED_DELAYS=0,5 NETBED_STAGES=3 bash benches/netbed.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --locked -p shoal-netbed
target="${CARGO_TARGET_DIR:-$PWD/target}"
export SHOAL_NETBED_DELAY="$target/debug/shoal-netbed-delay"
export NETBED_OUT="${NETBED_OUT:-$target/netbed.json}"
cargo bench --locked --profile dev --bench netbed | tee "$target/netbed.md"
python3 benches/plot_netbed.py "$NETBED_OUT" benches/netbed.png
