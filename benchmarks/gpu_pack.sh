#!/usr/bin/env bash
# Build .gpu/ (git-ignored): everything the GPU checks of benchmarks/gpu_session.sh need that does not travel with the
# working tree (../shared does not travel; the device has no registry access). Run here, in the repo root, before
# the device `run`, and carry the one folder: carry = [".gpu"]. Idempotent: what is already there is reused.
#
#   .gpu/data/          `dwml prepare` of the bundled corpus exactly as configs/gpu-compare-9min.toml's [prepare]
#                       would (dwml.experiments.experiment.ensure_data with the config itself; vocabulary 16,384). The session
#                       copies it to the experiment's out_dir/data, which the experiment then reuses (a directory
#                       with meta.json is never prepared again). bench_startup and bench_eval_sets use it too.
#   .gpu/eval/          blimp_filtered/, blimp_supplement/ (jsonl as-is) and ewok/ewok_data_babylm.zip (the password
#                       zip as-is, never extracted): DWML_EVAL_DATA=.gpu/eval. No fast subset is needed (the
#                       benchmarks and the CPU smoke run read the full sets with a limit).
#   .gpu/whl/           wheels the device image lacks: bayesian-optimization (the version installed here; `dwml
#                       search` needs it) and nvidia-ml-py (GPU utilisation sampling); gpu_session.sh installs them
#                       with `pip install --no-index --no-deps --target`.
#   .gpu/peers.json     the experiment's [search] result computed here: used on the device only if bayes_opt cannot
#                       be imported there (the session says so; the search is then not timed on the device).
#
#   bash benchmarks/gpu_pack.sh          # prints the sizes; fails if .gpu/ exceeds 60 MiB (the carry limit is 64)
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=.gpu
CONFIG=configs/gpu-compare-9min.toml
SHARED=../shared/data
LIMIT_MIB=60
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

git check-ignore -q "$PACK/" || { echo "gpu_pack: $PACK/ is not git-ignored (add /$PACK/ to .gitignore)" >&2; exit 1; }
[ -d "$SHARED/eval" ] || { echo "gpu_pack: $SHARED/eval not found" >&2; exit 1; }
mkdir -p "$PACK"

# 1. Prepared data (and the fallback peers.json), with the experiment's own code and config.
python3 - "$CONFIG" "$PACK" <<'EOF'
import json, shutil, sys, time
from pathlib import Path

from dwml.experiments.experiment import ensure_data, ensure_peers, load_experiment
from dwml.data.shards import load_meta

config, pack = sys.argv[1], Path(sys.argv[2])
cfg = load_experiment(config)
log = lambda s: print(f"gpu_pack: {s}", flush=True)
data = pack / "data"
if (data / "meta.json").is_file() and int(load_meta(data)["vocab_size"]) != cfg.prepare.vocab_size:
    log(f"{data}: vocabulary {load_meta(data)['vocab_size']} != {cfg.prepare.vocab_size}; preparing again")
    shutil.rmtree(data)
t0 = time.perf_counter()
ensure_data(cfg, pack, log)  # -> pack/data, exactly as the experiment prepares OUT/data
if time.perf_counter() - t0 > 1:
    log(f"prepared in {time.perf_counter() - t0:.0f} s (this machine)")
t0 = time.perf_counter()
peers = ensure_peers(cfg, pack, int(load_meta(data)["vocab_size"]), log)  # -> pack/peers.json (reused if same)
if time.perf_counter() - t0 > 1:
    log(f"searched in {time.perf_counter() - t0:.0f} s (this machine)")
log(f"peers: {json.dumps([{k: a[k] for k in ('layers', 'heads', 'hidden')} for a in peers])}")
EOF

# 2. Eval sets, laid out as ../shared/data/eval (cp -u: only what is missing or changed).
copy() {  # copy SRC_DIR DEST_DIR FILE...
    local src=$1 dst=$2
    shift 2
    mkdir -p "$dst"
    for f in "$@"; do
        cp -u --preserve=timestamps --no-preserve=mode "$src/$f" "$dst/$f"
    done
}
for set in blimp_filtered blimp_supplement; do
    (cd "$SHARED/eval/$set" && ls) | grep -E '\.(jsonl|txt)$' | while read -r f; do
        copy "$SHARED/eval/$set" "$PACK/eval/$set" "$f"
    done
done
copy "$SHARED/eval/ewok" "$PACK/eval/ewok" ewok_data_babylm.zip SOURCE.txt TERMS_OF_USE.txt LICENSE.txt

# 3. Wheels the device image lacks (pure Python): bayesian-optimization, the version installed here, for `dwml search`;
#    nvidia-ml-py (pynvml) so that training samples GPU utilisation and memory (timing_<run>.json; without it those
#    stay empty). Every requirement of theirs (extras aside) must be on the image already.
on_image="numpy scipy scikit-learn packaging colorama"
wheel() {  # wheel DIST VERSION
    local dist=$1 version=$2 file missing
    file=$(ls "$PACK"/whl/"${dist//-/_}"-"$version"-*.whl 2>/dev/null | head -1 || true)
    if [ -z "$file" ]; then
        rm -f "$PACK"/whl/"${dist//-/_}"-*.whl
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            -d "$PACK/whl" "$dist==$version" 2>&1 | grep -v "^WARNING: Location" || true
        file=$(ls "$PACK"/whl/"${dist//-/_}"-"$version"-*.whl)
    fi
    missing=$(unzip -p "$file" '*/METADATA' | sed -n 's/^Requires-Dist: *//p' | { grep -v "extra *==" || true; } \
              | sed 's/[ <>=!~;[].*//' | sort -u | while read -r dep; do
                  case " $on_image " in *" $dep "*) ;; *) echo "$dep" ;; esac
              done)
    [ -z "$missing" ] || { echo "gpu_pack: $file requires $missing, not known to be on the device image" >&2; exit 1; }
    echo "gpu_pack: $(basename "$file")"
}
wheel bayesian-optimization "$(python3 -c "from importlib.metadata import version; print(version('bayesian-optimization'))")"
wheel nvidia-ml-py 13.615.71

# 4. Sizes.
du -sh "$PACK"/data "$PACK"/eval "$PACK"/whl "$PACK"/peers.json | sed 's/^/gpu_pack: /'
bytes=$(du -sb "$PACK" | cut -f1)
mib=$(( (bytes + 1048575) / 1048576 ))
echo "gpu_pack: $PACK/ = $bytes bytes (${mib} MiB; carry limit 64 MiB, this script's limit $LIMIT_MIB MiB)"
[ "$bytes" -le $(( LIMIT_MIB * 1048576 )) ] || { echo "gpu_pack: $PACK/ is over $LIMIT_MIB MiB" >&2; exit 1; }
