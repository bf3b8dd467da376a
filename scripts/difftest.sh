#!/usr/bin/env bash
# The long run of the differential test (tests/difftest.rs, docs/difftest.md):
#
#   scripts/difftest.sh N [SEED]
#
# runs N random cases on the memory broker and on RabbitMQ (RABBITMQ_URL,
# default the local broker), split across DIFFTEST_JOBS processes (default
# 3), each with its own seed: SEED, SEED+1, ... when SEED is given, random
# ones otherwise. Prints each process's seed and result, then the totals
# (cases, divergences), and exits non-zero if any divergence was found or a
# process failed. Reproduce one process with the DIFFTEST_SEED and
# DIFFTEST_CASES it prints, one case with the DIFFTEST_CASE a divergence
# report prints. Logs are kept in $DIFFTEST_LOGS (default a fresh temporary
# directory).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -lt 1 || ! $1 =~ ^[0-9]+$ || $1 -lt 1 ]]; then
    echo "usage: scripts/difftest.sh N [SEED]   (N cases, N >= 1)" >&2
    exit 2
fi
total=$1
base_seed=${2:-}
jobs=${DIFFTEST_JOBS:-3}
if ((jobs > total)); then jobs=$total; fi
logs=${DIFFTEST_LOGS:-$(mktemp -d -t difftest.XXXXXX)}
mkdir -p "$logs"
export SWITCHYARD_REQUIRE_RABBITMQ=1

echo "==> building tests/difftest.rs"
exe=$(cargo test --features lapin,memory --test difftest --no-run --message-format=json 2>/dev/null |
    grep '"name":"difftest"' | grep -o '"executable":"[^"]*"' | tail -1 | cut -d'"' -f4)
if [[ -z $exe || ! -x $exe ]]; then
    echo "could not build the difftest binary; run: cargo test --features lapin,memory --test difftest --no-run" >&2
    exit 1
fi

start=$(date +%s)
pids=()
seeds=()
counts=()
for ((j = 0; j < jobs; j++)); do
    n=$((total / jobs + (j < total % jobs ? 1 : 0)))
    if [[ -n $base_seed ]]; then
        seed=$((base_seed + j))
    else
        seed=$(od -An -N6 -tu8 /dev/urandom | tr -d ' ')
    fi
    seeds+=("$seed")
    counts+=("$n")
    echo "==> process $j: DIFFTEST_SEED=$seed DIFFTEST_CASES=$n (log $logs/difftest-$j.log)"
    DIFFTEST_SEED=$seed DIFFTEST_CASES=$n "$exe" --nocapture >"$logs/difftest-$j.log" 2>&1 &
    pids+=($!)
done

failed=0
cases=0
divergences=0
unreproducible=0
late=0
chained=0
cycles=0
crowded=0
prio_ttl=0
for ((j = 0; j < jobs; j++)); do
    status=0
    wait "${pids[$j]}" || status=$?
    log="$logs/difftest-$j.log"
    summary=$(grep -E '^difftest: [0-9]+ cases' "$log" | tail -1 || true)
    if [[ -z $summary ]]; then
        echo "process $j (seed ${seeds[$j]}) ended without a summary (exit $status):" >&2
        tail -20 "$log" >&2
        failed=1
        continue
    fi
    echo "process $j (seed ${seeds[$j]}): ${summary#difftest: }"
    c=$(sed -E 's/^difftest: ([0-9]+) cases.*/\1/' <<<"$summary")
    d=$(sed -E 's/.* ([0-9]+) divergences.*/\1/' <<<"$summary")
    u=$(sed -E 's/.* ([0-9]+) unreproducible.*/\1/' <<<"$summary")
    l=$(sed -E 's/.* ([0-9]+) differing only after.*/\1/' <<<"$summary")
    y=$(sed -E 's/.* ([0-9]+) not compared.*/\1/' <<<"$summary")
    k=$(sed -E 's/.* ([0-9]+) compared cases went round.*/\1/' <<<"$summary")
    cases=$((cases + c))
    divergences=$((divergences + d))
    unreproducible=$((unreproducible + u))
    late=$((late + l))
    chained=$((chained + y))
    cycles=$((cycles + k))
    coverage=$(grep -E '^difftest: coverage:' "$log" | tail -1 || true)
    if [[ -n $coverage ]]; then
        crowded=$((crowded + $(sed -E 's/^difftest: coverage: ([0-9]+) cases.*/\1/' <<<"$coverage")))
        prio_ttl=$((prio_ttl + $(sed -E 's/.* ([0-9]+) with a message.*/\1/' <<<"$coverage")))
    fi
    if ((d > 0)); then
        sed -n '/DIVERGENCE, minimal case/,/^difftest: [0-9]* cases/p' "$log"
    fi
    if ((status != 0 && d == 0)); then
        echo "process $j (seed ${seeds[$j]}) failed (exit $status), see $log" >&2
        failed=1
    fi
done
elapsed=$(($(date +%s) - start))

echo
echo "difftest: $cases of $total cases run in ${elapsed}s by $jobs processes (seeds: ${seeds[*]}; cases: ${counts[*]})"
echo "difftest: $divergences divergences, $unreproducible unreproducible (timing) differences, $late cases differing only after RabbitMQ fell behind the timing guard, $chained not compared (chained short TTLs); $cycles compared cases went round a dead-letter cycle"
echo "difftest: coverage: $crowded cases with several consumers on a queue at once, $prio_ttl with a message that has both a priority and a TTL"
echo "difftest: logs in $logs"
if ((divergences > 0 || failed != 0 || cases != total)); then
    exit 1
fi
