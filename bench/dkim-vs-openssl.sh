#!/usr/bin/env bash
# DKIM signing rate per core against the raw signature rate, in one run:
#   1. the criterion bench `dkim_sign` (sluice's signing: canonicalize, hash and
#      sign a 1 KiB and a 100 KiB message; and the same keys' raw signature);
#   2. `openssl speed -seconds 3 rsa2048 ed25519` (OpenSSL's raw signature rate).
# Prints a markdown table: signatures/s and signing ÷ raw at each size.
#
# Usage: bench/dkim-vs-openssl.sh [--warm-up S] [--measure S]
#   defaults: --warm-up 1 --measure 3 (short: the build machine is shared).
# Needs openssl and jq; builds the bench with cargo.
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WARM=1 MEASURE=3
while [ $# -gt 0 ]; do
    case "$1" in
        --warm-up) WARM=${2:?}; shift ;;
        --measure) MEASURE=${2:?}; shift ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
for t in openssl jq; do command -v "$t" >/dev/null || { echo "needs $t" >&2; exit 1; }; done

cd "$REPO"
cargo bench -q -p sluice-bench --bench dkim_sign -- \
    --warm-up-time "$WARM" --measurement-time "$MEASURE" >&2
SPEED=$(openssl speed -seconds 3 rsa2048 ed25519 2>/dev/null)

# Mean time per iteration (ns) from criterion's estimates → per second.
rate() {
    local ns
    ns=$(jq '.mean.point_estimate' "$REPO/target/criterion/$1/new/estimates.json")
    awk -v ns="$ns" 'BEGIN { printf "%.0f", 1e9 / ns }'
}
ossl_rsa=$(awk '/^rsa 2048 bits/ { print $6 }' <<<"$SPEED")
ossl_ed=$(awk '/EdDSA \(Ed25519\)/ { print $7 }' <<<"$SPEED")
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f%%", 100 * a / b }'; }

echo "$(date -u '+%Y-%m-%d %H:%M UTC') — $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(openssl version)"
echo
echo "| algorithm | openssl speed sign/s | raw sign/s (same key) | sluice 1 KiB sign/s | sluice 100 KiB sign/s | 1 KiB ÷ openssl | 1 KiB ÷ raw (same library) | 100 KiB ÷ raw |"
echo "|---|---|---|---|---|---|---|---|"
for alg in rsa2048 ed25519; do
    if [ "$alg" = rsa2048 ]; then o=$ossl_rsa; else o=$ossl_ed; fi
    raw=$(rate "raw_sign/$alg")
    k1=$(rate "dkim_sign/$alg/1KiB")
    k100=$(rate "dkim_sign/$alg/100KiB")
    echo "| $alg | $o | $raw | $k1 | $k100 | $(ratio "$k1" "$o") | $(ratio "$k1" "$raw") | $(ratio "$k100" "$raw") |"
done
