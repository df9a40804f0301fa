#!/usr/bin/env bash
# One script for a lent GPU: GPU tests, TRM and kernel benchmarks, an autotune sweep over the
# TRM's shapes (with the bf16x3 tensor-core precision allowed). Writes flat files under $OUT as
# it goes (at most 8 come back):
#   gpu_check.log  everything printed, with per-section times and rc
#   tests_gpu.txt  pytest output of the GPU tests (bitwise repeat, sync-debug LASER step, ...)
#   compile_times.csv  sm_90 compile seconds of each kernel variant the TRM shapes launch
#   trm.csv, trm_sites.csv, kernels.csv   benchmark CSVs, rewritten after every row
#   <GPU name>.json   autotune sweep
#   SUMMARY.md     perf/report.py over the CSVs above
# Back on a CPU machine (no device time): `laser-triton bench compare --measured DIR/kernels.csv`
# puts the static model's prediction (perf/audit.py) beside each measured kernel time
# (DIR/model_compare.csv, summarized by binding bound in the next `bench report`); run on
# the tree that was measured. It is not run here: its sm_90 compiles would hold the GPU.
# Budgets: every section runs under `timeout`, its limit min(cap, what is left of TOTAL_S
# (default 400 s) after reserving the caps of the sections after it), so each later section
# keeps its share; the summary (30 s at most) runs last in any case: the whole script ends
# inside 8 minutes. The Triton cache is warmed (kernels/_warm.py, all cores but two) beside
# the GPU tests, for the TRM shapes, so the first TRM steps do not stall on 20-30 s compiles.
# Without a GPU it runs tiny CPU versions of each section (a dry run that proves the script
# works):  OUT=/tmp/x bash perf/gpu_check.sh   QUICK=1 makes it smaller still. AUTOTUNE=1|0|auto.
# PLAN=1 prints each section's worst-case limit without running anything (PLAN_GPU=1: the GPU
# path); SECTIONS="gpu_tests ..." runs only those sections; GPU_TEST_FILES overrides the test
# files (tests/test_gpu_check.py uses both). No network and no pip downloads are needed: the
# package is installed editable with --no-deps, or put on the path through a symlink tree.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the output folder}
mkdir -p "$OUT"
TOTAL_S=${TOTAL_S:-400}
START=$(date +%s)
PLAN=${PLAN:-0}
SIMULATED=0  # PLAN=1: seconds the skipped sections would have taken at worst
if [ "$PLAN" = 1 ]; then LOG=/dev/null; else LOG="$OUT/gpu_check.log"; : >"$LOG"; fi
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
RESULTS=()

# Python: $PYTHON, else the checkout's venv when there is no GPU (CPU dry run), else python3.
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif ! (nvidia-smi -L >/dev/null 2>&1) && [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
if [ "$PLAN" = 1 ]; then GPU=${PLAN_GPU:-0}
elif "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
then GPU=1; else GPU=0; fi
if [ "$GPU" = 0 ]; then
  export TRITON_INTERPRET=1  # kernels run under the interpreter on CPU (set before import)
fi

elapsed() { echo $(( $(date +%s) - START + SIMULATED )); }
want() { [ -z "${SECTIONS:-}" ] || [[ " $SECTIONS " == *" $1 "* ]]; }

# section_limit CAP RESERVE: min(CAP, time left - 15 s - RESERVE), RESERVE being the caps of
# the sections still to come, so that a slow section cannot eat a later one's share.
section_limit() {
  local cap=$1 reserve=$2
  local left=$(( TOTAL_S - $(elapsed) - 15 - reserve ))
  echo $(( cap < left ? cap : left ))
}

# section NAME CAP RESERVE CMD...: run CMD under `timeout` with section_limit's limit.
section() {
  local name=$1 cap=$2 reserve=$3; shift 3
  want "$name" || return 0
  local limit; limit=$(section_limit "$cap" "$reserve")
  if [ "$PLAN" = 1 ]; then
    echo "## $name: plan limit ${limit}s"; SIMULATED=$(( SIMULATED + limit )); return 0
  fi
  if [ "$limit" -lt 20 ]; then
    echo "## $name: skipped ($limit s left for it)"; RESULTS+=("$name: skipped"); return 0
  fi
  echo "## $name: start at $(elapsed)s, limit ${limit}s"
  local t0; t0=$(date +%s); local rc=0
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
  if "$PY" -c 'import laser_triton.kernels, laser_triton.tools.bench' 2>/dev/null; then
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
  ln -s "$PWD/perf" "$shim/perf"  # `-m perf.bench_*` with the working directory off the path
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
  # `python -c`/`-m` put the working directory first on sys.path, where ./laser_triton (no
  # kernels/ inside) would shadow the shim: keep it off the path (Python >= 3.11).
  export PYTHONSAFEPATH=1
  "$PY" -c 'import laser_triton.kernels; print("using the symlink shim", laser_triton.__file__)'
}

gpu_tests() {  # the end-to-end LASER checks first: the kernel suite compiles many variants
  set -o pipefail  # `bash -c` starts a new shell: without this, tee's rc 0 hid failures
  local files=${GPU_TEST_FILES:-tests/test_gpu_laser.py tests/test_kernels_gpu.py}
  local marks=(-m gpu); [ -n "${GPU_TEST_FILES:-}" ] && marks=()
  # shellcheck disable=SC2086
  "$PY" -m pytest -q "${marks[@]}" -p no:cacheprovider $files 2>&1 | tee "$OUT/tests_gpu.txt"
}

# Compile, for the GPU in use, every kernel variant the TRM shapes launch, into Triton's cache
# (compile seconds per variant in compile_times.csv). Runs in the background beside the tests.
warm() {
  local limit=$1
  if [ "$GPU" = 1 ]; then
    set -- --hidden 512 1536 1024 3072 128 256 --rank 16 15 32 31 64 63 128 127 136 \
      --rows 1552 776 --jobs "$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))"
  else
    set -- --hidden 128 --rank 16 15 --rows 100 --jobs 1
  fi
  timeout -k 5 "$limit" env -u TRITON_INTERPRET "$PY" -m laser_triton.kernels._warm "$@" \
    --time-budget $(( limit - 10 )) --csv "$OUT/compile_times.csv"
}

echo "gpu_check: OUT=$OUT GPU=$GPU PY=$PY TOTAL_S=$TOTAL_S PLAN=$PLAN $(date -u +%FT%TZ)"
export -f env_info gpu_tests  # `timeout` runs commands, so functions go through bash -c
export PY OUT GPU_TEST_FILES
# Caps (GPU / CPU dry run). Their sum stays under TOTAL_S, so every section gets its cap.
if [ "$GPU" = 1 ]; then T_TESTS=130 T_TRM=110 T_KBENCH=50 T_TUNE=60
else T_TESTS=60 T_TRM=60 T_KBENCH=45 T_TUNE=40; fi
section env 30 $(( T_TESTS + T_TRM + T_KBENCH + T_TUNE )) bash -c env_info
[ "$PLAN" = 1 ] || install  # not under timeout: it may export PYTHONPATH for the sections
WARM_PID=
if want warm; then
  # Warming ends before the TRM bench starts (it is what the bench's first steps need).
  W_LIMIT=$(section_limit "$T_TESTS" $(( T_TRM + T_KBENCH + T_TUNE )))
  if [ "$PLAN" = 1 ]; then echo "## warm: plan limit ${W_LIMIT}s (beside gpu_tests)"
  elif [ "$W_LIMIT" -ge 20 ]; then
    echo "## warm: start at $(elapsed)s, limit ${W_LIMIT}s, in the background"
    WARM_RC=$(mktemp)
    ( t0=$(date +%s); rc=0; warm "$W_LIMIT" 2>&1 | sed -u 's/^/[warm] /' || rc=$?
      echo "$rc $(( $(date +%s) - t0 ))" >"$WARM_RC" ) &
    WARM_PID=$!
  fi
fi
section gpu_tests "$T_TESTS" $(( T_TRM + T_KBENCH + T_TUNE )) bash -c gpu_tests
if [ -n "$WARM_PID" ]; then
  wait "$WARM_PID"
  read -r w_rc w_took <"$WARM_RC" || true
  echo "## warm: rc=${w_rc:-?} in ${w_took:-?}s"
  RESULTS+=("warm: rc=${w_rc:-?} ${w_took:-?}s")
fi
if [ "$GPU" = 1 ]; then
  section trm_bench "$T_TRM" $(( T_KBENCH + T_TUNE )) "$PY" -m perf.bench_trm \
    --out "$OUT/trm.csv" --steps 3 --warmup 1 --time-budget $(( T_TRM - 15 )) \
    --variant-timeout 60 --batch paper_maze=auto
  section kernel_bench "$T_KBENCH" "$T_TUNE" "$PY" -m perf.bench_kernels \
    --out "$OUT/kernels.csv" --time-budget $(( T_KBENCH - 10 )) --rep-ms 40
elif [ "${QUICK:-0}" = 1 ]; then  # smallest CPU versions (the test suite's dry run)
  section trm_bench "$T_TRM" $(( T_KBENCH + T_TUNE )) "$PY" -m perf.bench_trm \
    --out "$OUT/trm.csv" --presets tiny --batch tiny=2 --scopes cycle \
    --variants plain sac laser_torch plain+compile
  section kernel_bench "$T_KBENCH" "$T_TUNE" "$PY" -m perf.bench_kernels \
    --out "$OUT/kernels.csv" --quick --rows 100 --hidden 64 --rank 4 \
    --providers torch reference --no-orth
else
  section trm_bench "$T_TRM" $(( T_KBENCH + T_TUNE )) "$PY" -m perf.bench_trm \
    --out "$OUT/trm.csv" --presets tiny tiny_att --batch tiny=2 tiny_att=2 \
    --variants plain ckpt sac laser_torch plain+compile
  section kernel_bench "$T_KBENCH" "$T_TUNE" "$PY" -m perf.bench_kernels \
    --out "$OUT/kernels.csv" --quick --rows 100 --hidden 64 --rank 4 8
fi
# The sweep (tensor-core bf16x3 candidates, the default) writes its JSON after every entry.
if [ "${AUTOTUNE:-auto}" != 0 ]; then
  section autotune "$T_TUNE" 0 "$PY" -m laser_triton autotune \
    --hidden ${AUTOTUNE_HIDDEN:-512 1536} --rank ${AUTOTUNE_RANK:-32 64} \
    --dtype bf16 --max-candidates ${AUTOTUNE_CANDIDATES:-3} --out "$OUT"
else
  RESULTS+=("autotune: skipped")
fi
if [ "$PLAN" = 1 ]; then
  echo "## report: plan limit 30s"
  exit 0
fi
if want report; then
  echo "## report: start at $(elapsed)s"  # always, even when the budget is spent
  timeout -k 5 30 "$PY" -m perf.report --results "$OUT" --summary "$OUT/SUMMARY.md" --no-plots
  RESULTS+=("report: rc=$?")
fi

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
