#!/usr/bin/env bash
# One script for a lent GPU: GPU tests, TRM and kernel benchmarks, an optional autotune sweep
# over the TRM's shapes. Writes flat files under $OUT as it goes (at most 8 come back):
#   gpu_check.log  everything printed, with per-section times
#   tests_gpu.txt  pytest output of the GPU tests (bitwise repeat, sync-debug LASER step, ...)
#   trm.csv, trm_sites.csv, kernels.csv   benchmark CSVs, rewritten after every row
#   <GPU name>.json   autotune sweep (only if time is left, or AUTOTUNE=1)
#   SUMMARY.md     perf/report.py over the CSVs above
# Every section runs under `timeout`, sized from what is left of TOTAL_S (default 420 s); the
# summary (a few seconds, 30 at most) runs last in any case, so the script ends inside 8 minutes. Without a GPU it runs tiny CPU versions of each
# section (a dry run that proves the script works):  OUT=/tmp/x bash perf/gpu_check.sh
# QUICK=1 makes the CPU dry run smaller still (tests/test_perf.py). AUTOTUNE=1|0|auto.
# No network and no pip downloads are needed: the package is installed editable with
# --no-deps, or put on the path through a symlink tree if pip cannot.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the output folder}
mkdir -p "$OUT"
TOTAL_S=${TOTAL_S:-420}
START=$(date +%s)
LOG="$OUT/gpu_check.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
RESULTS=()

# Python: $PYTHON, else the checkout's venv when there is no GPU (CPU dry run), else python3.
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif ! (nvidia-smi -L >/dev/null 2>&1) && [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
then GPU=1; else GPU=0; fi
if [ "$GPU" = 0 ]; then
  export TRITON_INTERPRET=1  # kernels run under the interpreter on CPU (set before import)
fi

elapsed() { echo $(( $(date +%s) - START )); }

# section NAME CAP_SECONDS CMD...: run CMD under a timeout of min(CAP, time left - 15 s).
section() {
  local name=$1 cap=$2; shift 2
  local left=$(( TOTAL_S - $(elapsed) - 15 ))
  local limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 20 ]; then
    echo "## $name: skipped (${left}s left)"; RESULTS+=("$name: skipped"); return 0
  fi
  echo "## $name: start at $(elapsed)s, limit ${limit}s"
  local t0=$(date +%s) rc=0
  timeout -k 5 "$limit" "$@" || rc=$?
  local took=$(( $(date +%s) - t0 ))
  [ "$rc" = 124 ] && echo "## $name: TIMED OUT after ${limit}s (partial results kept)"
  echo "## $name: rc=$rc in ${took}s"
  RESULTS+=("$name: rc=$rc ${took}s")
}

env_info() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem \
    --format=csv 2>/dev/null || echo "no nvidia-smi: CPU dry run"
  "$PY" - <<'EOF'
import platform, torch
try:
    import triton; tv = triton.__version__
except Exception as exc:
    tv = f"unavailable ({exc})"
import pandas
print(f"python {platform.python_version()}  torch {torch.__version__}  triton {tv}  "
      f"pandas {pandas.__version__}  cuda {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, "
          f"sm_{p.major}{p.minor}")
EOF
}

install() {
  if "$PY" -c 'import laser_triton.kernels, laser_triton.bench' 2>/dev/null; then
    echo "laser_triton already importable"; return 0
  fi
  if timeout 120 "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3 &&
     "$PY" -c 'import laser_triton.kernels' 2>/dev/null; then
    echo "installed editable (--no-deps)"; return 0
  fi
  # The wheel maps kernels/ and autotune_configs/ into the package: mirror that with links.
  local shim=/tmp/laser_triton_shim
  rm -rf "$shim" && mkdir -p "$shim"
  cp -rs "$PWD/laser_triton" "$shim/laser_triton"
  ln -s "$PWD/kernels" "$shim/laser_triton/kernels"
  ln -s "$PWD/autotune_configs" "$shim/laser_triton/autotune_configs"
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
  # `python -c`/`-m` put the working directory first on sys.path, where ./laser_triton (no
  # kernels/ inside) would shadow the shim: keep it off the path (Python >= 3.11).
  export PYTHONSAFEPATH=1
  "$PY" -c 'import laser_triton.kernels; print("using the symlink shim", laser_triton.__file__)'
}

gpu_tests() {  # the end-to-end LASER checks first: the kernel suite compiles many variants
  "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_laser.py \
    tests/test_kernels_gpu.py 2>&1 | tee "$OUT/tests_gpu.txt"
}

echo "gpu_check: OUT=$OUT GPU=$GPU PY=$PY TOTAL_S=$TOTAL_S $(date -u +%FT%TZ)"
export -f env_info gpu_tests  # `timeout` runs commands, so functions go through bash -c
export PY OUT
section env 30 bash -c env_info
install  # not under timeout: it may export PYTHONPATH for the sections below
# The GPU tests JIT-compile ~40 kernel variants on a fresh machine (1-16 s each, measured as
# sm_90 compiles on CPU): most of their time. The benches after them take what is left.
section gpu_tests $([ "$GPU" = 1 ] && echo 180 || echo 60) bash -c gpu_tests
if [ "$GPU" = 1 ]; then
  section trm_bench 200 "$PY" -m perf.bench_trm --out "$OUT/trm.csv" --steps 3 --warmup 1 \
    --time-budget 185 --variant-timeout 90 --batch paper_maze=auto
  section kernel_bench 90 "$PY" -m perf.bench_kernels --out "$OUT/kernels.csv" \
    --time-budget 75 --rep-ms 40
elif [ "${QUICK:-0}" = 1 ]; then  # smallest CPU versions (the test suite's dry run)
  section trm_bench 60 "$PY" -m perf.bench_trm --out "$OUT/trm.csv" --presets tiny \
    --batch tiny=2 --scopes cycle --variants plain sac laser_torch plain+compile
  section kernel_bench 60 "$PY" -m perf.bench_kernels --out "$OUT/kernels.csv" --quick \
    --rows 100 --hidden 64 --rank 4 --providers torch reference --no-orth
else
  section trm_bench 150 "$PY" -m perf.bench_trm --out "$OUT/trm.csv" --presets tiny tiny_att \
    --batch tiny=2 tiny_att=2 --variants plain ckpt sac laser_torch plain+compile
  section kernel_bench 90 "$PY" -m perf.bench_kernels --out "$OUT/kernels.csv" --quick \
    --rows 100 --hidden 64 --rank 4 8
fi
# The sweep writes its JSON after every entry; it runs when asked or when time is left.
if [ "${AUTOTUNE:-auto}" = 1 ] || { [ "${AUTOTUNE:-auto}" = auto ] &&
    [ $(( TOTAL_S - $(elapsed) )) -gt 90 ]; }; then
  section autotune 300 "$PY" -m laser_triton.cli autotune \
    --hidden ${AUTOTUNE_HIDDEN:-512 1536 1024 3072} --rank ${AUTOTUNE_RANK:-32 64 16 128} \
    --dtype bf16 --max-candidates ${AUTOTUNE_CANDIDATES:-4} --out "$OUT"
else
  RESULTS+=("autotune: skipped")
fi
echo "## report: start at $(elapsed)s"  # always, even when the budget is spent
timeout -k 5 30 "$PY" perf/report.py --results "$OUT" --summary "$OUT/SUMMARY.md" --no-plots
RESULTS+=("report: rc=$?")

echo
echo "== gpu_check done in $(elapsed)s (GPU=$GPU) =="
printf '  %s\n' "${RESULTS[@]}"
ls -la "$OUT"
for f in "$OUT/trm.csv" "$OUT/kernels.csv"; do
  [ -s "$f" ] && timeout 30 "$PY" - "$f" <<'EOF'
import sys, pandas as pd
df = pd.read_csv(sys.argv[1])
if "kernel" in df:
    df = df[(df.provider == "triton") & df.error.isna()]
    cols = ["kernel", "mode", "layout", "N", "D", "r", "ms_median", "frac_of_roofline",
            "speedup_vs_torch"]
else:
    cols = ["preset", "scope", "variant", "batch", "peak_mem_mib", "activation_mib", "step_ms",
            "time_ratio_vs_plain", "status"]
print(df[cols].head(40).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
EOF
done
sleep 1  # let tee flush the log before the files are collected
exit 0
