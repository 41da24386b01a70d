#!/usr/bin/env bash
# The GPU checks of issues 9 and 10, run on the lent device (one H200) by the `run` tool, one stage per call.
#
# Before the first call, here: `bash benchmarks/gpu_pack.sh` (builds the git-ignored .gpu/: prepared data, eval sets,
# wheels; ../shared does not travel). Every call carries that one folder. Device calls (stage | timeout_s | carry |
# command; tests/test_gpu_session.py reads these lines):
#
# device: all | 600 | .gpu | bash benchmarks/gpu_session.sh all
# device: compare | 600 | .gpu | bash benchmarks/gpu_session.sh compare
# device: bench | 330 | .gpu | bash benchmarks/gpu_session.sh bench 300
#
# Stages (each command stays inside its timeout_s; logs and results are written into $OUT as they go, so what
# finished comes back even from a call that is cut short; at most 5 files: session.log, summary.txt, report.md,
# results.json, experiment.tar.gz):
#   compare  issue 9: nvidia-smi and versions, then `dwml experiment configs/gpu-compare-9min.toml` (prepared data
#            from .gpu/data, so the device does not prepare; the 4 peers are searched there) under `timeout`
#            (DWML_GPU_EXP_TIMEOUT, default 540 s: the target itself); wall time measured here with `date +%s`; if
#            it did not finish, `--report-only` (30 s at most) builds a report of what did. Then report.md,
#            results.json, experiment.tar.gz (peers.json, eval/timing/flops JSONs, figures, each run's config,
#            metrics.jsonl and summaries; no weights) and the key numbers with issue 9's acceptance checks
#            (benchmarks/gpu_summary.py).
#   bench [BUDGET_S [NAMES]]  issue 10, in priority order, each under its own timeout and all within BUDGET_S
#            (default 300): throughput (bench_throughput.py), eval_sets (bench_eval_sets.py, the 48.7M peer on the
#            three full sets), startup (bench_startup.py), outer_modes (bench_outer_modes.py --gpu-peers). A bench
#            that no longer fits is skipped and says so. NAMES (comma-separated) runs a subset.
#   all      compare, then bench with what is left of a 585 s call.
#
# Plan for 15 minutes of device time (machine start ~1-2 min included; all durations below are UNMEASURED: the
# budgets are the config's and the benchmarks' own estimates, none was run on a GPU):
#   1. `all` (timeout_s 600): compare first, since issue 9 needs its whole run; the benchmarks get whatever of the
#      ~585 s the experiment leaves (their timeouts shrink to fit; skipped ones are listed in summary.txt).
#   2. If `status` still shows >= 60 s of budget and the machine is warm (it goes back after 30 s idle: call at
#      once), `bench B NAMES` with B = budget_left_s - 40, timeout_s = B + 20, and NAMES = the benchmarks step 1
#      skipped. A second `compare` on a warm machine resumes the experiment (finished stages are reused; the
#      summary then says its wall time covers only the rest).
#   Then give the machine back.
#
# Here, on the CPU: `OUT=/tmp/x bash benchmarks/gpu_session.sh --cpu-smoke STAGE` runs the same stages with tiny
# shapes (`--set` overrides as tests/test_gpu_config.py, `--tiny` flags) on the same .gpu/ folder, with the wheels
# installed the same way into a --target folder (tests/test_gpu_session.py, -m slow).
#
#   bash benchmarks/gpu_session.sh --list           # the stages
#   bash benchmarks/gpu_session.sh --device-runs    # the device calls above, one per line
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SELF=benchmarks/gpu_session.sh
STAGES="compare bench all"
BENCHES="throughput eval_sets startup outer_modes"

SMOKE=0
if [ "${1:-}" = "--cpu-smoke" ]; then SMOKE=1; shift; fi
case "${1:-}" in
    --list) echo "$STAGES"; exit 0 ;;
    --device-runs) sed -n 's/^# device: //p' "$SELF"; exit 0 ;;
esac
STAGE=${1:-}
case " $STAGES " in *" $STAGE "*) ;; *)
    echo "usage: bash $SELF [--cpu-smoke] {${STAGES// /|}} [BUDGET_S [NAMES]] | --list | --device-runs" >&2; exit 2 ;;
esac
[ -n "${OUT:-}" ] || { echo "gpu_session: \$OUT is not set (the folder whose files come back)" >&2; exit 2; }
mkdir -p "$OUT"
PACK=$ROOT/.gpu
[ -f "$PACK/data/meta.json" ] && [ -d "$PACK/eval" ] && ls "$PACK"/whl/*.whl >/dev/null 2>&1 || {
    echo "gpu_session: $PACK is incomplete: run benchmarks/gpu_pack.sh here and carry .gpu" >&2; exit 2; }

T0=$(date +%s)
if [ "$SMOKE" = 1 ]; then
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/dwml_gpu_smoke.XXXXXX")
    [ -n "${DWML_GPU_KEEP:-}" ] || trap 'rm -rf "$WORK"' EXIT  # DWML_GPU_KEEP=1 keeps it for inspection
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} RAYON_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
else
    WORK=/tmp/dwml_gpu
    mkdir -p "$WORK"
fi
SITE=$WORK/site
LOG=$OUT/session.log
SUMMARY=$OUT/summary.txt
# No hub look-ups (the device reaches no network: a look-up would only wait for its timeout).
export DWML_EVAL_DATA=$PACK/eval PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

note() { echo "$*" >> "$SUMMARY"; echo "[gpu_session] $*"; }
elapsed() { echo $(( $(date +%s) - T0 )); }

setup() {
    echo "== $(date -u +%FT%TZ) stage $STAGE$([ "$SMOKE" = 1 ] && echo ' (cpu-smoke)') in $ROOT, work $WORK"
    # The device image lacks these wheels; the same line as documented for device commands, into a --target dir.
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$PACK"/whl/*.whl && export PYTHONPATH=$SITE:$ROOT/src || { note "wheel install failed"; return 1; }
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
        nvidia-smi
    else
        echo "nvidia-smi: not found"
    fi
    (git -C "$ROOT" log -1 --format='commit %h %s' 2>/dev/null || echo "commit: no git here") | head -1
    python3 - <<'EOF'
import importlib, platform, os
print(f"python {platform.python_version()}, {os.cpu_count()} CPUs")
for mod in ("dwml", "torch", "transformers", "tokenizers", "numpy", "scipy", "sklearn", "bayes_opt", "pynvml"):
    try:
        m = importlib.import_module(mod)
        print(f"  {mod} {getattr(m, '__version__', '?')}  ({os.path.dirname(m.__file__)})")
    except Exception as e:  # noqa: BLE001 - a report line, not a failure
        print(f"  {mod}: NOT importable ({type(e).__name__}: {e})")
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"cuda {torch.version.cuda}, {p.name}, {p.total_memory / 2**30:.0f} GiB, bf16 {torch.cuda.is_bf16_supported()}")
else:
    print("cuda: not available")
EOF
}

# ---------------------------------------------------------------------------------------------------------- compare
stage_compare() {
    local config=configs/gpu-compare-9min.toml exp=runs/gpu-compare-9min limit=${DWML_GPU_EXP_TIMEOUT:-540}
    local sets=() start rc wall
    if [ "$SMOKE" = 1 ]; then  # tests/test_gpu_config.py's shrink, sized for vocab 16,384; the same stages
        exp=$WORK/exp
        echo '{"layers": 2, "heads": 2, "hidden": 64, "intermediate": 128}' > "$WORK/ref.json"
        local s
        for s in "out_dir=\"$exp\"" "search.reference=\"$WORK/ref.json\"" "search.layers=[1, 4]" \
                 "search.heads=[1, 2]" "search.head_dim=[8, 16]" search.head_dim_step=8 search.init_points=2 \
                 search.n_iter=2 base.data.seq_len=64 base.data.heldout_sequences=8 base.train.max_steps=4 \
                 base.train.batch_size=4 base.train.warmup_steps=1 base.train.eval_every=2 \
                 base.train.eval_batches=1 base.train.progress=false base.distill.outer_every=2 eval.limit=1; do
            sets+=(--set "$s")
        done
        limit=${DWML_GPU_EXP_TIMEOUT:-300}
    fi
    # The experiment reuses OUT/data when it has meta.json: put the packed data there (no prepare on the device).
    if [ -e "$exp" ]; then
        note "compare: $exp existed before this call ($(ls "$exp" | tr '\n' ' ')): finished stages are reused, so the wall time covers only the rest"
    fi
    if [ ! -f "$exp/data/meta.json" ]; then
        mkdir -p "$exp" && cp -r "$PACK/data" "$exp/data" || { note "compare: cannot copy the data to $exp"; return 1; }
    fi
    if ! python3 -c "import bayes_opt" 2>/dev/null && [ ! -f "$exp/peers.json" ]; then
        cp "$PACK/peers.json" "$exp/peers.json"
        note "compare: bayes_opt is not importable: using .gpu/peers.json searched on the packing machine (search NOT timed here)"
    fi
    echo "== dwml experiment $config ${sets[*]} (timeout ${limit} s)"
    start=$(date +%s)
    timeout -k 5 "$limit" python3 -m dwml.cli experiment "$config" "${sets[@]}"
    rc=$?
    wall=$(( $(date +%s) - start ))
    note "compare: dwml experiment exit $rc after $wall s (timeout $limit s$([ $rc = 124 ] && echo ': TIMED OUT'))"
    if [ $rc != 0 ] && [ -f "$exp/data/meta.json" ] && [ -f "$exp/peers.json" ]; then  # (no peers: no plan)
        echo "== report of what finished (--report-only)"
        timeout -k 5 30 python3 -m dwml.cli experiment "$config" "${sets[@]}" --report-only \
            || note "compare: --report-only failed too (exit $?)"
    fi
    local f
    for f in report.md results.json; do
        [ -f "$exp/$f" ] && [ "$(stat -c %Y "$exp/$f")" -ge "$start" ] && cp "$exp/$f" "$OUT/$f"
    done
    if [ -d "$exp" ]; then
        (cd "$exp" && find . -path ./data -prune -o -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.toml' \
            -o -name '*.png' -o -name '*.md' \) ! -path '*/checkpoints/*' ! -name 'tokenizer*.json' -print | sort \
            | tar -czf "$OUT/experiment.tar.gz" -T -) || note "compare: experiment.tar.gz failed"
        [ -f "$OUT/experiment.tar.gz" ] && [ "$(stat -c %s "$OUT/experiment.tar.gz")" -gt $((15 * 1048576)) ] \
            && { rm -f "$OUT/experiment.tar.gz"; note "compare: experiment.tar.gz over 15 MiB, left out"; }
    fi
    python3 benchmarks/gpu_summary.py "$exp" --wall "$wall" --rc "$rc" --since "$start" >> "$SUMMARY" \
        || note "compare: gpu_summary.py failed"
    return 0
}

# ------------------------------------------------------------------------------------------------------------ bench
bench_cmd() {  # the command line of one benchmark (GPU shapes on the device, tiny ones with --cpu-smoke)
    local data=$PACK/data
    if [ "$SMOKE" = 1 ]; then
        case $1 in
            throughput) echo "benchmarks/bench_throughput.py --tiny --steps 2 --eval-limit 1 --threads 1" ;;
            eval_sets) echo "benchmarks/bench_eval_sets.py --device cpu --layers 1 --heads 1 --hidden 32 --intermediate 64 --limit 2 --tokenizer $data" ;;
            startup) echo "benchmarks/bench_startup.py --steps 2 --prepared $data --device cpu" ;;
            outer_modes) echo "benchmarks/bench_outer_modes.py --hidden 32,16 --batch-size 4 --seq-len 32 --repeats 1 --threads 1" ;;
        esac
    else
        case $1 in
            throughput) echo "benchmarks/bench_throughput.py" ;;
            eval_sets) echo "benchmarks/bench_eval_sets.py --tokenizer $data" ;;
            startup) echo "benchmarks/bench_startup.py --prepared $data" ;;
            outer_modes) echo "benchmarks/bench_outer_modes.py --gpu-peers --batch-size 256 --repeats 3" ;;
        esac
    fi
}

bench_cap() {  # the longest each benchmark may run (s): the scripts' own estimates with a margin, unmeasured
    case $1 in throughput) echo 200 ;; eval_sets) echo 180 ;; startup) echo 60 ;; outer_modes) echo 90 ;; esac
}

stage_bench() {
    local budget=${1:-300} names=${2:-$BENCHES} deadline name cap left t start rc cmd
    deadline=$(( $(date +%s) + budget ))
    note "bench: budget $budget s for: ${names//,/ }"
    for name in ${names//,/ }; do
        case " $BENCHES " in *" $name "*) ;; *) note "bench $name: unknown (expected: $BENCHES)"; continue ;; esac
        cap=$(bench_cap "$name")
        left=$(( deadline - $(date +%s) ))
        t=$(( left - 5 < cap ? left - 5 : cap ))
        if [ "$t" -lt 20 ]; then
            note "bench $name: SKIPPED (${left} s of the budget left)"
            continue
        fi
        cmd=$(bench_cmd "$name")
        echo "== python3 $cmd (timeout $t s)"
        start=$(date +%s)
        # shellcheck disable=SC2086 # the command line is split on purpose
        timeout -k 5 "$t" python3 $cmd 2>&1 | tee "$WORK/bench_$name.out"
        rc=${PIPESTATUS[0]}
        note "bench $name: exit $rc in $(( $(date +%s) - start )) s (timeout $t s$([ "$rc" = 124 ] && echo ': TIMED OUT'))"
        grep -v -i -E 'warning|^\s*$|warn\(' "$WORK/bench_$name.out" | tail -n 14 | sed 's/^/    /' >> "$SUMMARY"
    done
}

main() {
    setup || return 1
    case $STAGE in
        compare) stage_compare ;;
        bench) stage_bench "${2:-300}" "${3:-$BENCHES}" ;;
        all)
            stage_compare
            stage_bench $(( 585 - $(elapsed) ))
            ;;
    esac
}

: > "$SUMMARY"
main "$@" 2>&1 | tee -a "$LOG"
echo "== summary ($(elapsed) s in this call; files in \$OUT: $(ls "$OUT" | tr '\n' ' '))" | tee -a "$LOG"
cat "$SUMMARY"
