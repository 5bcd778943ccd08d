#!/usr/bin/env bash
# Everything one GPU machine call needs, from the repository root:
#
#   bash benchmarks/gpu_suite.sh                                   # all steps
#   STEPS="env build tests kernels sanitize" bash benchmarks/gpu_suite.sh   # first call
#   STEPS="env build e2e" bash benchmarks/gpu_suite.sh                      # second call
#
# Steps, run in the order STEPS names them (default: all, in this order):
#   env       GPU, driver, nvcc, torch, Python
#   build     pip install -e . with TORCHFLUENCE_CUDA=ON for CUDA_ARCH, in build/gpu, with the
#             ptxas resource report (registers, shared memory, stack, spills) of every kernel
#   tests     the CUDA-marked tests (up to 10 failures), then the rest of the suite (pytest-xdist when present;
#             the whole suite when a CUDA test failed)
#   sanitize  compute-sanitizer memcheck, racecheck, initcheck, synccheck on the CUDA kernel tests
#   kernels   benchmarks/bench_gpu_kernels.py (ceilings, topk_merge, scoring, psg_dot)
#   e2e       benchmarks/bench_gpu_e2e.py --device cuda
#   profile   benchmarks/profile_gpu_ekfac.py (stage times, torch.profiler's top operators) into bench.log
# Wheels in .whl/ (when the folder exists) are installed first into /tmp/site, on PYTHONPATH.
# tests, sanitize, kernels and e2e need the CUDA build: without `build` in STEPS it is
# built anyway when `import torchfluence` has no CUDA kernels. Put kernels before sanitize
# when the call is short, so that a slow compute-sanitizer cannot crowd the benchmarks out.
#
# Files under $OUT (default bench_out/), at most eight: summary.md, env_build_tests.log,
# sanitizer.log, bench.log, kernels.md, kernels.json, e2e.md, e2e.json. The step table
# (status, seconds, key numbers) is printed last and written to summary.md.
#
# Every step runs under `timeout`, within SUITE_BUDGET seconds for the whole script
# (default 560, for a 600 s call), so the summary is printed even when a step hangs.
# Other settings: PYTHON (python3), CUDA_ARCH (90), JOBS (build jobs, nproc),
# PYTEST_WORKERS (8), TESTS_ALL (0: CUDA-marked tests only), SANITIZE_TOOLS, SANITIZE_TESTS, SANITIZE_K, KERNELS_ARGS, E2E_ARGS, E2E_BUDGET,
# and per-step limits LIMIT_BUILD, LIMIT_TESTS_CUDA, LIMIT_TESTS_ALL, LIMIT_SANITIZE,
# LIMIT_KERNELS, LIMIT_E2E (seconds).
set -uo pipefail

OUT=${OUT:-bench_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
ARCH=${CUDA_ARCH:-90}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 4)}
STEPS=${STEPS:-env build tests sanitize kernels e2e}
DEADLINE=$((SECONDS + ${SUITE_BUDGET:-560}))
RESERVE=12 # seconds kept for the summary
# The toolkit's tools (nvcc, compute-sanitizer) where they are not on PATH already.
if ! command -v nvcc >/dev/null 2>&1 && [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export PATH=$PATH:/usr/local/cuda/bin
fi

LOG_MAIN=$OUT/env_build_tests.log
LOG_SAN=$OUT/sanitizer.log
LOG_BENCH=$OUT/bench.log
SUMMARY=$OUT/summary.md
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
: >"$LOG_MAIN"

ROWS=()      # "step|status|seconds|notes"
FAILED=()    # steps whose output tail is shown before the summary
EXCERPTS=""  # files holding those tails
STEP_RC=0
STEP_SECONDS=0

has_step() { [[ " $STEPS " == *" $1 "* ]]; }

elapsed() { printf '%4ds' "$SECONDS"; }

add_row() { # name status seconds notes
  local notes=${4//|//}
  ROWS+=("$1|$2|$3|${notes//$'\n'/; }")
  echo "[$(elapsed)] $1: $2 (${3}s) ${notes//$'\n'/; }"
}

status_of() { # rc -> text
  case $1 in
    0) echo ok ;;
    124 | 137) echo "TIMEOUT" ;;
    99) echo "skipped (no time left)" ;;
    *) echo "FAIL (exit $1)" ;;
  esac
}

# run NAME LIMIT LOG CMD...: CMD under `timeout` (LIMIT seconds, less when the budget is
# shorter); its output goes to $TMP/NAME.out and is appended to LOG. Sets STEP_RC, STEP_SECONDS.
run() {
  local name=$1 limit=$2 log=$3
  shift 3
  local budget=$((DEADLINE - SECONDS - RESERVE))
  STEP_SECONDS=0
  if ((budget < 15)); then
    STEP_RC=99
    echo "=== $name: skipped, ${budget}s of the budget left" >>"$log"
    return 99
  fi
  ((limit > budget)) && limit=$budget
  echo "=== $name (limit ${limit}s): $*" >>"$log"
  echo "[$(elapsed)] $name: started (limit ${limit}s)"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" >"$TMP/$name.out" 2>&1
  STEP_RC=$?
  STEP_SECONDS=$((SECONDS - t0))
  cat "$TMP/$name.out" >>"$log"
  echo "=== $name: exit $STEP_RC after ${STEP_SECONDS}s" >>"$log"
  if ((STEP_RC != 0 && STEP_RC != 99)); then
    FAILED+=("$name")
    {
      echo "--- $name (exit $STEP_RC), last lines:"
      grep -v '^\s*$' "$TMP/$name.out" | tail -n 15 | cut -c1-220
    } >"$TMP/$name.tail"
    EXCERPTS+=" $TMP/$name.tail"
  fi
  return "$STEP_RC"
}

forget_failure() { # a step that is retried: drop its earlier failure
  local kept=() f
  for f in "${FAILED[@]}"; do [[ $f == "$1" ]] || kept+=("$f"); done
  FAILED=("${kept[@]}")
  EXCERPTS=${EXCERPTS// $TMP\/$1.tail/}
}

pytest_counts() { # the last pytest result line of a step's output, or how far it got
  local line
  line=$(grep -E '[0-9]+ (passed|failed|error|errors|skipped|deselected)' "$TMP/$1.out" 2>/dev/null | tail -n 1 |
    sed -E 's/=+//g; s/^ +//; s/ +$//')
  if [[ -z $line ]]; then
    local progress failures
    progress=$(grep -oE '\[ *[0-9]+%\]' "$TMP/$1.out" 2>/dev/null | tail -n 1)
    failures=$(grep -cE '^(FAILED|ERROR) ' "$TMP/$1.out" 2>/dev/null)
    line="no result line, got to ${progress:-[0%]}, ${failures:-0} failures listed"
  fi
  echo "$line"
}

cuda_built() {
  "$PY" -c "import sys, torchfluence as t; sys.exit(0 if t.build_info()['cuda'] else 1)" >/dev/null 2>&1
}

# ---------------------------------------------------------------------------- env
step_env() {
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); host: $(uname -srm); cpus: $(nproc 2>/dev/null)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit,pstate \
      --format=csv 2>&1 || echo "nvidia-smi: not available"
    # The card as found (clocks, temperature, power, memory in use), for reading the timings.
    nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw,utilization.gpu,memory.used \
      --format=csv 2>&1 || true
    (nvcc --version 2>&1 | tail -n 2) || echo "nvcc: not found"
    command -v compute-sanitizer || echo "compute-sanitizer: not on PATH"
    "$PY" - <<'EOF'
import sys
import torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    l2 = getattr(p, "L2_cache_size", 0) / 2**20
    print(f"device {p.name}: cc {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB, L2 {l2:.0f} MiB")
EOF
  } >"$TMP/env.out" 2>&1
  cat "$TMP/env.out" >>"$LOG_MAIN"
  local gpu torch_line
  gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1)
  torch_line=$(grep -m1 '^torch ' "$TMP/env.out")
  add_row env ok 0 "${gpu:-no nvidia-smi}; ${torch_line:-torch not importable}; $(grep -m1 -o 'release [0-9.]*' "$TMP/env.out" | sed 's/release/nvcc/')"
}

# ---------------------------------------------------------------------------- wheels
step_wheels() {
  local wheels=(.whl/*.whl)
  [[ -e ${wheels[0]} ]] || return 0
  run wheels 120 "$LOG_MAIN" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site "${wheels[@]}"
  if ((STEP_RC == 0)); then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  local names
  names=$(for w in "${wheels[@]}"; do basename "$w" | cut -d- -f1-2; done | tr '\n' ' ')
  add_row wheels "$(status_of $STEP_RC)" "$STEP_SECONDS" "$names"
}

# ---------------------------------------------------------------------------- build
ptxas_report() { # BUILD_OUTPUT: a per-kernel resource table into $TMP/ptxas.txt, one summary line out
  "$PY" - "$1" "$TMP/ptxas.txt" "$ARCH" <<'EOF'
import re, shutil, subprocess, sys

text = open(sys.argv[1], errors="replace").read()
rows, current = {}, None
for line in text.splitlines():
    m = re.search(r"ptxas info\s*: (?:Compiling entry function|Function properties for) '?([\w$]+)'?", line)
    if m:
        current = m.group(1)
        rows.setdefault(current, {})
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and current:
        rows[current].update(stack=int(m[1]), spill_st=int(m[2]), spill_ld=int(m[3]))
        continue
    m = re.search(r"ptxas info\s*: Used (\d+) registers(.*)", line)
    if m and current:
        smem = re.search(r"(\d+) bytes smem", m[2])
        rows[current].update(regs=int(m[1]), smem=int(smem[1]) if smem else 0)
names = list(rows)
filt = shutil.which("cu++filt") or shutil.which("c++filt")
pretty = names
if filt and names:
    try:
        pretty = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    except OSError:
        pass
kernels = [(p, rows[n]) for n, p in zip(names, pretty) if "regs" in rows[n]]
with open(sys.argv[2], "w") as f:
    f.write(f"ptxas resource report (sm_{sys.argv[3]}): registers, static shared memory, stack frame and "
            "spill store/load bytes per kernel\n")
    for p, r in kernels:
        f.write(f"  {r['regs']:4d} regs {r.get('smem', 0):6d} smem {r.get('stack', 0):5d} stack "
                f"{r.get('spill_st', 0)}/{r.get('spill_ld', 0)} spill  {p[:160]}\n")
spilling = [p for p, r in kernels if r.get("spill_st", 0) or r.get("spill_ld", 0)]
stack = [p for p, r in kernels if r.get("stack", 0)]
if kernels:
    print(f"{len(kernels)} kernels, max {max(r['regs'] for _, r in kernels)} regs, "
          f"{len(spilling)} spilling, {len(stack)} with stack frames")
else:
    print("no ptxas report found")
EOF
}

step_build() {
  local label=${1:-build}
  export CMAKE_BUILD_PARALLEL_LEVEL=$JOBS
  run "$label" "${LIMIT_BUILD:-420}" "$LOG_MAIN" env TORCHFLUENCE_CUDA=ON "$PY" -m pip install \
    --no-build-isolation --no-deps -v -e . \
    -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$ARCH" -Cbuild-dir=build/gpu \
    -Ccmake.define.CMAKE_CUDA_FLAGS=-Xptxas=-v
  local rc=$STEP_RC seconds=$STEP_SECONDS notes ptx info
  if [[ -s $TMP/$label.out ]]; then
    ptx=$(ptxas_report "$TMP/$label.out" 2>&1 | tail -n 1)
    [[ $ptx == "no ptxas report found" ]] && ptx="no ptxas report (no CUDA source recompiled)"
    cat "$TMP/ptxas.txt" >>"$LOG_MAIN" 2>/dev/null
    grep -iE "warning|error" "$TMP/$label.out" | grep -vE "^\s*(-- |Looking|Performing)" | sort -u | head -n 40 \
      | sed 's/^/build diagnostic: /' >>"$LOG_MAIN"
  fi
  info=$("$PY" -c "import torchfluence as t; i = t.build_info(); print(i); \
print('cuda=%s archs=%s max_fused_topk=%s' % (i['cuda'], i['cuda_architectures'], i['max_fused_topk']))" 2>&1)
  echo "build_info: $info" >>"$LOG_MAIN"
  notes="$(echo "$info" | tail -n 1 | cut -c1-120); ${ptx:-no ptxas report}"
  if ((rc == 0)) && ! cuda_built; then
    rc=1
    notes="installed, but import torchfluence has no CUDA kernels; $notes"
  fi
  add_row "$label" "$(status_of $rc)" "$seconds" "$notes"
  return $rc
}

# ---------------------------------------------------------------------------- tests
step_tests() {
  run tests-cuda "${LIMIT_TESTS_CUDA:-240}" "$LOG_MAIN" "$PY" -m pytest tests -q --maxfail=10 -m cuda -p no:cacheprovider
  local cuda_rc=$STEP_RC
  add_row tests-cuda "$(status_of $STEP_RC)" "$STEP_SECONDS" "$(pytest_counts tests-cuda) $(grep -m3 -E '^(FAILED|ERROR) ' "$TMP/tests-cuda.out" 2>/dev/null | cut -c1-120)"
  [[ ${TESTS_ALL:-1} == 0 ]] && return # TESTS_ALL=0: the CUDA-marked tests only
  local xdist=() workers=${PYTEST_WORKERS:-8} threads=$JOBS
  if "$PY" -c "import xdist" >/dev/null 2>&1; then
    xdist=(-n "$workers")
    threads=$((JOBS / workers > 0 ? JOBS / workers : 1)) # CPU threads per worker: no oversubscription
  fi
  # The whole suite; when the CUDA tests all passed just above, the rest of it (-m "not cuda").
  local marker=() scope="whole suite"
  if ((cuda_rc == 0)); then
    marker=(-m "not cuda")
    scope="not cuda (cuda passed above)"
  fi
  run tests-all "${LIMIT_TESTS_ALL:-300}" "$LOG_MAIN" env OMP_NUM_THREADS="$threads" \
    "$PY" -m pytest tests -q "${marker[@]}" "${xdist[@]}" -p no:cacheprovider
  add_row tests-all "$(status_of $STEP_RC)" "$STEP_SECONDS" "$scope${xdist[*]:+, xdist ${xdist[*]}}: $(pytest_counts tests-all) $(grep -m3 -E '^(FAILED|ERROR) ' "$TMP/tests-all.out" 2>/dev/null | cut -c1-120)"
}

# ---------------------------------------------------------------------------- sanitize
# The kernel tests on their small shapes; the heavier engine-level tests are left out.
SANITIZE_TESTS=${SANITIZE_TESTS:-tests/test_ops_boundary.py tests/test_influence_block.py tests/test_psg_dot.py tests/test_head.py tests/test_projection.py}
SANITIZE_K=${SANITIZE_K:-not opcheck and not kfac and not conv_net and not engine}

step_sanitize() {
  : >"$LOG_SAN"
  if ! command -v compute-sanitizer >/dev/null 2>&1; then
    if [[ -x /usr/local/cuda/bin/compute-sanitizer ]]; then
      export PATH=/usr/local/cuda/bin:$PATH
    else
      add_row sanitize "FAIL (no compute-sanitizer)" 0 ""
      FAILED+=(sanitize)
      return 1
    fi
  fi
  local tool env_args filter summary
  # shellcheck disable=SC2206
  local tests=($SANITIZE_TESTS)
  for tool in ${SANITIZE_TOOLS:-memcheck racecheck initcheck synccheck}; do
    env_args=()
    filter=()
    case $tool in
      # Without torch's caching allocator every tensor is its own allocation, so an
      # access past a tensor's end is out of bounds for memcheck, and initcheck sees each
      # tensor's own initialisation.
      memcheck | initcheck) env_args=(PYTORCH_NO_CUDA_MEMORY_CACHING=1) ;;
      # Shared-memory and barrier checks: the library's own kernels only.
      racecheck | synccheck) filter=(--kernel-name kns=torchfluence) ;;
    esac
    run "sanitize-$tool" "${LIMIT_SANITIZE:-120}" "$LOG_SAN" env "${env_args[@]}" compute-sanitizer --tool "$tool" \
      --error-exitcode 9 "${filter[@]}" "$PY" -m pytest "${tests[@]}" -q -x -m cuda -k "$SANITIZE_K" -p no:cacheprovider
    if ((STEP_RC != 0 && ${#filter[@]} > 0)) && grep -qiE "unrecognized|unknown option|invalid (value|option)" "$TMP/sanitize-$tool.out"; then
      # An older compute-sanitizer without this filter syntax: check every kernel instead.
      forget_failure "sanitize-$tool"
      run "sanitize-$tool" "${LIMIT_SANITIZE:-120}" "$LOG_SAN" compute-sanitizer --tool "$tool" \
        --error-exitcode 9 "$PY" -m pytest "${tests[@]}" -q -x -m cuda -k "$SANITIZE_K" -p no:cacheprovider
    fi
    summary=$(grep -hE "(ERROR|RACECHECK|SYNCCHECK|INITCHECK) SUMMARY" "$TMP/sanitize-$tool.out" 2>/dev/null |
      tail -n 1 | sed 's/^=* *//')
    if [[ -z $summary ]]; then # cut short: count the reports printed so far
      summary="no summary line, $(grep -cE '^========= (Invalid|Uninitialized|Error|Barrier|Warning|Program hit)' \
        "$TMP/sanitize-$tool.out" 2>/dev/null) reports before the end"
    fi
    add_row "sanitize-$tool" "$(status_of $STEP_RC)" "$STEP_SECONDS" "$summary; $(pytest_counts "sanitize-$tool")"
  done
}

# ---------------------------------------------------------------------------- benchmarks
step_kernels() {
  : >>"$LOG_BENCH"
  # shellcheck disable=SC2086
  run kernels "${LIMIT_KERNELS:-300}" "$LOG_BENCH" "$PY" benchmarks/bench_gpu_kernels.py \
    --markdown "$OUT/kernels.md" --json "$OUT/kernels.json" ${KERNELS_ARGS:-}
  local notes
  notes=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1])).get('headline', ''))" "$OUT/kernels.json" 2>/dev/null)
  add_row kernels "$(status_of $STEP_RC)" "$STEP_SECONDS" "${notes:-no kernels.json}"
}

step_e2e() {
  : >>"$LOG_BENCH"
  if [[ ! -f benchmarks/bench_gpu_e2e.py ]]; then
    add_row e2e "FAIL (benchmarks/bench_gpu_e2e.py missing)" 0 ""
    FAILED+=(e2e)
    return 1
  fi
  # Its own time budget (E2E_BUDGET, default 380 s) shrinks to what this call has left, so
  # that it ends and writes its tables before `timeout` would cut it.
  local limit=${LIMIT_E2E:-540} left=$((DEADLINE - SECONDS - RESERVE - 20)) budget=${E2E_BUDGET:-380}
  ((left < limit)) && limit=$left
  ((budget > limit - 10)) && budget=$((limit - 10))
  ((budget < 30)) && budget=30
  # shellcheck disable=SC2086
  run e2e "${LIMIT_E2E:-540}" "$LOG_BENCH" "$PY" benchmarks/bench_gpu_e2e.py --device cuda \
    --budget "$budget" --markdown "$OUT/e2e.md" --json "$OUT/e2e.json" ${E2E_ARGS:-}
  local notes
  notes=$("$PY" -c "import json, sys; d = json.load(open(sys.argv[1])); print(d.get('headline', '') if isinstance(d, dict) else '')" \
    "$OUT/e2e.json" 2>/dev/null)
  [[ -f $OUT/e2e.md ]] || notes="no e2e.md; $notes"
  add_row e2e "$(status_of $STEP_RC)" "$STEP_SECONDS" "${notes:-see e2e.md}"
}

step_profile() {
  : >>"$LOG_BENCH"
  # shellcheck disable=SC2086
  run profile "${LIMIT_PROFILE:-240}" "$LOG_BENCH" "$PY" benchmarks/profile_gpu_ekfac.py ${PROFILE_ARGS:-}
  add_row profile "$(status_of $STEP_RC)" "$STEP_SECONDS" "$(grep -E '^[a-z_ 0-9x]+( \(profiled\))?: [0-9.]+ s$' "$TMP/profile.out" | tr '\n' ';')"
}

# ---------------------------------------------------------------------------- main
echo "[$(elapsed)] gpu_suite: STEPS='$STEPS', OUT=$OUT, python=$PY, budget ${SUITE_BUDGET:-560}s"
step_wheels
built_checked=0
for step in $STEPS; do
  case $step in
    env) step_env ;;
    build) step_build build ;;
    tests | sanitize | kernels | e2e | profile)
      if ((!built_checked)) && ! has_step build; then
        cuda_built || step_build build-auto
      fi
      built_checked=1
      "step_$step"
      ;;
    *)
      add_row "$step" "FAIL (unknown step; known: env build tests sanitize kernels e2e)" 0 ""
      FAILED+=("$step")
      ;;
  esac
done

# Output tails of failed steps, the benchmark tables, then the one summary table.
for f in $EXCERPTS; do head -c 1500 "$f"; done
for md in "$OUT/kernels.md" "$OUT/e2e.md"; do
  if [[ -s $md ]]; then
    echo
    head -c 3500 "$md"
    echo
  fi
done
n_files=$(find "$OUT" -type f | wc -l)
{
  echo "## gpu_suite ($(date -u +%Y-%m-%dT%H:%M:%SZ), ${SECONDS}s, STEPS: $STEPS)"
  echo
  echo "| step | status | s | key numbers |"
  echo "|---|---|---|---|"
  for row in "${ROWS[@]}"; do
    IFS='|' read -r name status secs notes <<<"$row"
    echo "| $name | $status | $secs | ${notes:0:300} |"
  done
  ((n_files + 1 > 8)) && echo "warning: $((n_files + 1)) files under $OUT, only 8 come back"
  ((${#FAILED[@]})) && echo "failed: ${FAILED[*]} (logs: env_build_tests.log, sanitizer.log, bench.log)"
} >"$SUMMARY"
echo
cat "$SUMMARY"
# Exit status: 0 only when every step that ran passed.
((${#FAILED[@]} == 0))
