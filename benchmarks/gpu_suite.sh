#!/usr/bin/env bash
# Everything one GPU machine call needs, from the repository root:
#
#   bash benchmarks/gpu_suite.sh                        # the default steps, within SUITE_BUDGET
#   STEPS="env build e2e" bash benchmarks/gpu_suite.sh  # the race alone
#   SUITE_DEVICE=cpu PYTHON=.bench-venv/bin/python STEPS="env e2e" bash benchmarks/gpu_suite.sh
#                                                       # a smoke run without a GPU (tiny sizes)
#
# Steps, run in the order STEPS names them. The default, in order of value:
#   env       GPU, driver, nvcc, torch, Python
#   build     pip install -e . with TORCHFLUENCE_CUDA=ON for CUDA_ARCH, in build/gpu, with the
#             ptxas resource report (registers, shared memory, stack, spills) of every kernel
#   e2e       benchmarks/bench_gpu_e2e.py --device cuda: the race against kronfluence 1.0.1
#             (kronfluence fp32, kronfluence AMP, torchfluence fp32, one pass, bf16 factors + captures)
#   profile   benchmarks/profile_gpu_ekfac.py: stage times and each stage's top operators
#             (self CUDA time): fit factors, eigenvalue correction, query preparation, scoring
#   tests     the CUDA-marked tests of the default paths (TESTS_PATHS; up to 10 failures);
#             TESTS_ALL=1 adds the rest of the suite
#   sanitize  compute-sanitizer memcheck and racecheck on the kernels of the default paths
#             (topk_merge and sjlt tests)
#   kernels   benchmarks/bench_gpu_kernels.py --only ceilings (copy bandwidth, matmul rates)
# A step starts only when the time it needs is left (MIN_<STEP> seconds); otherwise its row
# says "skipped (no time left)". Steps placed before e2e (other than env and build) leave
# E2E_NEED seconds (default 360) to it: the race is the point of the call.
# Wheels in .whl/ (`make gpu-peer-wheels`: kronfluence and einconv) are installed first into
# SITE (/tmp/site), on PYTHONPATH; without them, or when kronfluence does not import, the
# wheels row and the kronfluence rows of the race say FAIL, and so does the e2e step.
# e2e, profile, tests, sanitize and kernels need the CUDA build: without `build` in STEPS it
# is built anyway when `import torchfluence` has no CUDA kernels.
#
# Files under $OUT (default bench_out/), at most eight: summary.md, env_build_tests.log,
# sanitizer.log, bench.log (kernels, e2e and profile output), kernels.md, kernels.json,
# e2e.md (the race table, ready for benchmarks/RESULTS.md), e2e.json. The step table
# (status, seconds, key numbers, then each profiled stage's top operators) is printed and
# written to summary.md, which is rewritten after every step; the race table is printed last.
#
# Every step runs under `timeout`, within SUITE_BUDGET seconds for the whole script
# (default 560, for a 600 s call), so the summary is printed even when a step hangs (and on
# SIGTERM/SIGINT). Other settings: PYTHON (python3), SUITE_DEVICE (cuda; cpu: a smoke run
# that builds nothing, runs e2e and profile at tiny sizes on the CPU and leaves out
# sanitize), CUDA_ARCH (90), JOBS (build jobs, nproc), PYTEST_WORKERS (8, with TESTS_ALL=1),
# TESTS_PATHS, TESTS_ALL (0), SANITIZE_TOOLS, SANITIZE_TESTS, SANITIZE_K, KERNELS_ARGS,
# E2E_ARGS, E2E_BUDGET (cap on the race's own budget), PROFILE_ARGS, E2E_NEED, per-step limits
# LIMIT_BUILD, LIMIT_E2E, LIMIT_PROFILE, LIMIT_TESTS_CUDA, LIMIT_TESTS_ALL, LIMIT_SANITIZE,
# LIMIT_KERNELS and minimums MIN_E2E, MIN_PROFILE, MIN_TESTS, MIN_SANITIZE (per tool),
# MIN_KERNELS (seconds).
set -uo pipefail

OUT=${OUT:-bench_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
DEVICE=${SUITE_DEVICE:-cuda}
ARCH=${CUDA_ARCH:-90}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 4)}
SITE=${SITE:-/tmp/site}
STEPS=${STEPS:-env build e2e profile tests sanitize kernels}
BUDGET=${SUITE_BUDGET:-560}
DEADLINE=$((SECONDS + BUDGET))
RESERVE=12 # seconds kept for the summary
E2E_NEED=${E2E_NEED:-360}
E2E_PENDING=0
[[ " $STEPS " == *" e2e "* ]] && E2E_PENDING=1
if [[ $DEVICE == cpu ]]; then
  E2E_DEFAULT="--quick --peer-amp"
  PROFILE_DEFAULT="--n-train 256 --n-query 32 --width 8 --block 128"
else
  E2E_DEFAULT=""
  PROFILE_DEFAULT=""
fi
E2E_ARGS=${E2E_ARGS-$E2E_DEFAULT}
PROFILE_ARGS=${PROFILE_ARGS-$PROFILE_DEFAULT}
TESTS_PATHS=${TESTS_PATHS:-tests/test_ops_boundary.py tests/test_influence_block.py tests/test_projection.py tests/test_precision.py tests/test_capture.py}
SANITIZE_TESTS=${SANITIZE_TESTS:-tests/test_ops_boundary.py tests/test_projection.py}
SANITIZE_K=${SANITIZE_K:-(topk_merge or sjlt) and not fused and not opcheck and not compile and not 2_to_the_31}
# The toolkit's tools (nvcc, compute-sanitizer) where they are not on PATH already.
if ! command -v nvcc >/dev/null 2>&1 && [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export PATH=$PATH:/usr/local/cuda/bin
fi

LOG_MAIN=$OUT/env_build_tests.log
LOG_SAN=$OUT/sanitizer.log
LOG_BENCH=$OUT/bench.log
SUMMARY=$OUT/summary.md
TMP=$(mktemp -d)
: >"$LOG_MAIN"

ROWS=()       # "step|status|seconds|notes"
FAILED=()     # steps whose output tail is shown before the summary
EXCERPTS=""   # files holding those tails
PROFILE_LINES="" # the profile step's per-stage lines, for the summary
STEP_RC=0
STEP_SECONDS=0
CHILD=""      # the step command running now (its `timeout`), for the signal handler
CHILD_STEP="" # its step name and log
CHILD_LOG=""

has_step() { [[ " $STEPS " == *" $1 "* ]]; }

elapsed() { printf '%4ds' "$SECONDS"; }

write_summary() {
  local n_files row name status secs notes
  n_files=$(find "$OUT" -type f ! -name summary.md ! -name summary.md.tmp | wc -l)
  n_files=$((n_files + 1)) # summary.md itself
  {
    echo "## gpu_suite ($(date -u +%Y-%m-%dT%H:%M:%SZ), ${SECONDS}s of ${BUDGET}s, device $DEVICE, STEPS: $STEPS)"
    echo
    echo "| step | status | s | key numbers |"
    echo "|---|---|---|---|"
    for row in "${ROWS[@]}"; do
      IFS='|' read -r name status secs notes <<<"$row"
      echo "| $name | $status | $secs | ${notes:0:400} |"
    done
    if [[ -n $PROFILE_LINES ]]; then
      echo
      if [[ $DEVICE == cpu ]]; then
        echo "profile, per stage (wall time; top operators by self CPU time):"
      else
        echo "profile, per stage (wall time; top operators by self CUDA time, % of the stage's kernel time):"
      fi
      echo "- ${PROFILE_LINES//$'\n'/$'\n'- }"
    fi
    if ((n_files > 8)); then
      echo "warning: $n_files files under $OUT, only 8 come back"
    fi
    if ((${#FAILED[@]})); then
      echo "failed: ${FAILED[*]} (logs: env_build_tests.log, sanitizer.log, bench.log)"
    fi
  } >"$SUMMARY.tmp"
  mv -f "$SUMMARY.tmp" "$SUMMARY"
}

add_row() { # name status seconds notes
  local notes=${4//|//}
  notes=${notes//$'\n'/; }
  ROWS+=("$1|$2|$3|$notes")
  echo "[$(elapsed)] $1: $2 (${3}s) $notes"
  write_summary
}

fail() { # name notes: a FAIL row for a step that could not run
  add_row "$1" "FAIL" 0 "$2"
  FAILED+=("$1")
}

status_of() { # rc -> text
  case $1 in
    0) echo ok ;;
    124 | 137) echo "TIMEOUT" ;;
    99) echo "skipped (no time left)" ;;
    *) echo "FAIL (exit $1)" ;;
  esac
}

# run NAME LIMIT MIN LOG CMD...: CMD under `timeout` (LIMIT seconds, less when the budget is
# shorter); its output goes to $TMP/NAME.out and is appended to LOG. Sets STEP_RC, STEP_SECONDS.
# When less than MIN seconds are left (after those kept for e2e, for a step before it), CMD
# does not run: the step's row says "skipped (no time left)" and STEP_RC is 99.
run() {
  local name=$1 limit=$2 min=$3 log=$4
  shift 4
  local kept=0
  if ((E2E_PENDING)) && [[ $name != e2e && $name != build* && $name != wheels ]]; then
    kept=$E2E_NEED
  fi
  local left=$((DEADLINE - SECONDS - RESERVE - kept))
  STEP_SECONDS=0
  if ((left < min)); then
    STEP_RC=99
    local why="${left}s left, needs ${min}s"
    ((kept)) && why="$why (${kept}s kept for e2e)"
    echo "=== $name: skipped, $why" >>"$log"
    add_row "$name" "$(status_of 99)" 0 "$why"
    return 99
  fi
  ((limit > left)) && limit=$left
  echo "=== $name (limit ${limit}s): $*" >>"$log"
  echo "[$(elapsed)] $name: started (limit ${limit}s)"
  local t0=$SECONDS
  CHILD_T0=$t0
  # In the background, so that a signal reaches the handler at once (`wait` returns).
  timeout -k 10 "$limit" "$@" >"$TMP/$name.out" 2>&1 </dev/null &
  CHILD=$!
  CHILD_STEP=$name
  CHILD_LOG=$log
  wait "$CHILD"
  STEP_RC=$?
  CHILD=""
  STEP_SECONDS=$((SECONDS - t0))
  cat "$TMP/$name.out" >>"$log"
  echo "=== $name: exit $STEP_RC after ${STEP_SECONDS}s" >>"$log"
  if ((STEP_RC != 0)); then
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
  timeout 120 "$PY" -c "import sys, torchfluence as t; sys.exit(0 if t.build_info()['cuda'] else 1)" >/dev/null 2>&1
}

# ---------------------------------------------------------------------------- env
step_env() {
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); host: $(uname -srm); cpus: $(nproc 2>/dev/null)"
    timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit,pstate \
      --format=csv 2>&1 || echo "nvidia-smi: not available"
    # The card as found (clocks, temperature, power, memory in use), for reading the timings.
    timeout 20 nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw,utilization.gpu,memory.used \
      --format=csv 2>&1 || true
    (timeout 20 nvcc --version 2>&1 | tail -n 2) || echo "nvcc: not found"
    command -v compute-sanitizer || echo "compute-sanitizer: not on PATH"
    timeout 60 "$PY" - <<'PYEOF'
import sys
import torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    l2 = getattr(p, "L2_cache_size", 0) / 2**20
    print(f"device {p.name}: cc {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB, L2 {l2:.0f} MiB")
PYEOF
  } >"$TMP/env.out" 2>&1
  cat "$TMP/env.out" >>"$LOG_MAIN"
  local gpu torch_line
  gpu=$(timeout 20 nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1)
  torch_line=$(grep -m1 '^torch ' "$TMP/env.out")
  add_row env ok 0 "${gpu:-no nvidia-smi}; ${torch_line:-torch not importable}; $(grep -m1 -o 'release [0-9.]*' "$TMP/env.out" | sed 's/release/nvcc/')"
}

# ---------------------------------------------------------------------------- wheels
kronfluence_import() { # '' when kronfluence imports, else the last line of the error
  local err
  err=$(timeout 120 "$PY" -c "import kronfluence, kronfluence.analyzer, kronfluence.arguments" 2>&1) && return 0
  echo "$err" | grep -v '^\s*$' | tail -n 1 | cut -c1-200
  return 1
}

step_wheels() {
  local wheels=(.whl/*.whl) names="" problem
  if [[ -e ${wheels[0]} ]]; then
    run wheels 120 15 "$LOG_MAIN" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$SITE" "${wheels[@]}"
    ((STEP_RC == 99)) && return
    if ((STEP_RC == 0)); then
      export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    fi
    names=$(for w in "${wheels[@]}"; do basename "$w" | cut -d- -f1-2; done | tr '\n' ' ')
  elif ! has_step e2e; then
    return 0
  fi
  has_step e2e || { add_row wheels "$(status_of "$STEP_RC")" "$STEP_SECONDS" "$names"; return; }
  if problem=$(kronfluence_import); then
    if [[ -n $names ]]; then
      add_row wheels "$(status_of "$STEP_RC")" "$STEP_SECONDS" "${names}; kronfluence imports"
    else
      add_row wheels ok 0 "no .whl/, kronfluence imports from the environment"
    fi
  else
    [[ -z $names ]] && names="no .whl/ (make gpu-peer-wheels, carry .whl)"
    add_row wheels FAIL "$STEP_SECONDS" "${names}; kronfluence does not import: $problem; the race's kronfluence rows will FAIL"
    [[ " ${FAILED[*]} " == *" wheels "* ]] || FAILED+=(wheels)
  fi
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
  if [[ $DEVICE == cpu ]]; then
    add_row "$label" "skipped (SUITE_DEVICE=cpu)" 0 "the installed torchfluence is used"
    return 0
  fi
  export CMAKE_BUILD_PARALLEL_LEVEL=$JOBS
  run "$label" "${LIMIT_BUILD:-420}" 60 "$LOG_MAIN" env TORCHFLUENCE_CUDA=ON "$PY" -m pip install \
    --no-build-isolation --no-deps -v -e . \
    -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$ARCH" -Cbuild-dir=build/gpu \
    -Ccmake.define.CMAKE_CUDA_FLAGS=-Xptxas=-v
  ((STEP_RC == 99)) && return 99
  local rc=$STEP_RC seconds=$STEP_SECONDS notes ptx info
  if [[ -s $TMP/$label.out ]]; then
    ptx=$(ptxas_report "$TMP/$label.out" 2>&1 | tail -n 1)
    [[ $ptx == "no ptxas report found" ]] && ptx="no ptxas report (no CUDA source recompiled)"
    cat "$TMP/ptxas.txt" >>"$LOG_MAIN" 2>/dev/null
    grep -iE "warning|error" "$TMP/$label.out" | grep -vE "^\s*(-- |Looking|Performing)" | sort -u | head -n 40 \
      | sed 's/^/build diagnostic: /' >>"$LOG_MAIN"
  fi
  info=$(timeout 120 "$PY" -c "import torchfluence as t; i = t.build_info(); print(i); \
print('cuda=%s archs=%s max_fused_topk=%s' % (i['cuda'], i['cuda_architectures'], i['max_fused_topk']))" 2>&1)
  echo "build_info: $info" >>"$LOG_MAIN"
  notes="$(echo "$info" | tail -n 1 | cut -c1-120); ${ptx:-no ptxas report}"
  if ((rc == 0)) && ! cuda_built; then
    rc=1
    notes="installed, but import torchfluence has no CUDA kernels; $notes"
    FAILED+=("$label")
  fi
  add_row "$label" "$(status_of $rc)" "$seconds" "$notes"
  return $rc
}

# ---------------------------------------------------------------------------- e2e, profile
step_e2e() {
  : >>"$LOG_BENCH"
  if [[ ! -f benchmarks/bench_gpu_e2e.py ]]; then
    fail e2e "benchmarks/bench_gpu_e2e.py missing"
    E2E_PENDING=0
    return 1
  fi
  E2E_PENDING=0 # from here on, no time is kept for it
  # The race's own budget: what this call has left, less the seconds the script needs around
  # it (imports before its clock starts, the tables after the last row), capped by E2E_BUDGET.
  # Its extra rows (TF32) also leave a profile step after it the time that step needs.
  local left=$((DEADLINE - SECONDS - RESERVE)) budget extra after
  local limit=${LIMIT_E2E:-560}
  ((limit > left)) && limit=$left
  budget=$((limit - 30))
  [[ -n ${E2E_BUDGET:-} ]] && ((budget > E2E_BUDGET)) && budget=$E2E_BUDGET
  ((budget < 30)) && budget=30
  extra=$budget
  after=" ${STEPS#*e2e} "
  [[ $after == *" profile "* ]] && extra=$((budget - ${MIN_PROFILE:-45} - 10))
  rm -f "$OUT/e2e.md" "$OUT/e2e.json"
  # shellcheck disable=SC2086
  run e2e "$limit" "${MIN_E2E:-90}" "$LOG_BENCH" "$PY" benchmarks/bench_gpu_e2e.py --device "$DEVICE" \
    --budget "$budget" --extra-budget "$extra" --markdown "$OUT/e2e.md" --json "$OUT/e2e.json" $E2E_ARGS
  ((STEP_RC == 99)) && return 99
  local notes status
  notes=$(timeout 60 "$PY" -c "import json, sys; d = json.load(open(sys.argv[1])); \
print(d.get('headline', '') if isinstance(d, dict) else '')" "$OUT/e2e.json" 2>/dev/null)
  [[ -f $OUT/e2e.md ]] || notes="no e2e.md; $notes"
  status=$(status_of "$STEP_RC")
  # Exit 3: a row failed (its reason is in the headline), the tables are complete.
  ((STEP_RC == 3)) && status="FAIL (rows failed)"
  add_row e2e "$status" "$STEP_SECONDS" "${notes:-see e2e.md}"
}

step_profile() {
  : >>"$LOG_BENCH"
  # shellcheck disable=SC2086
  run profile "${LIMIT_PROFILE:-150}" "${MIN_PROFILE:-45}" "$LOG_BENCH" "$PY" benchmarks/profile_gpu_ekfac.py \
    --device "$DEVICE" $PROFILE_ARGS
  ((STEP_RC == 99)) && return 99
  PROFILE_LINES=$(grep -E '^stage ' "$TMP/profile.out" | cut -c1-600)
  local notes
  notes=$(grep -E '^stage ' "$TMP/profile.out" | sed -E 's/^stage ([^:]+): ([0-9.]+ s).*/\1 \2/' | tr '\n' ';')
  [[ -z $notes ]] && notes=$(grep -v '^\s*$' "$TMP/profile.out" | tail -n 1 | cut -c1-200)
  add_row profile "$(status_of "$STEP_RC")" "$STEP_SECONDS" "$notes (operators below)"
}

# ---------------------------------------------------------------------------- tests
step_tests() {
  # shellcheck disable=SC2206
  local paths=($TESTS_PATHS)
  run tests-cuda "${LIMIT_TESTS_CUDA:-180}" "${MIN_TESTS:-60}" "$LOG_MAIN" "$PY" -m pytest "${paths[@]}" -q \
    --maxfail=10 -m cuda -p no:cacheprovider
  ((STEP_RC == 99)) && return 99
  add_row tests-cuda "$(status_of $STEP_RC)" "$STEP_SECONDS" "$(pytest_counts tests-cuda) $(grep -m3 -E '^(FAILED|ERROR) ' "$TMP/tests-cuda.out" 2>/dev/null | cut -c1-120)"
  [[ ${TESTS_ALL:-0} == 1 ]] || return 0 # TESTS_ALL=1: then the rest of the suite
  local xdist=() workers=${PYTEST_WORKERS:-8} threads=$JOBS
  if timeout 60 "$PY" -c "import xdist" >/dev/null 2>&1; then
    xdist=(-n "$workers")
    threads=$((JOBS / workers > 0 ? JOBS / workers : 1)) # CPU threads per worker: no oversubscription
  fi
  run tests-all "${LIMIT_TESTS_ALL:-300}" "${MIN_TESTS:-60}" "$LOG_MAIN" env OMP_NUM_THREADS="$threads" \
    "$PY" -m pytest tests -q -m "not cuda" "${xdist[@]}" -p no:cacheprovider
  ((STEP_RC == 99)) && return 99
  add_row tests-all "$(status_of $STEP_RC)" "$STEP_SECONDS" "not cuda${xdist[*]:+, xdist ${xdist[*]}}: $(pytest_counts tests-all) $(grep -m3 -E '^(FAILED|ERROR) ' "$TMP/tests-all.out" 2>/dev/null | cut -c1-120)"
}

# ---------------------------------------------------------------------------- sanitize
step_sanitize() {
  : >>"$LOG_SAN"
  if [[ $DEVICE == cpu ]]; then
    add_row sanitize "skipped (SUITE_DEVICE=cpu)" 0 "compute-sanitizer needs a GPU"
    return 0
  fi
  if ! command -v compute-sanitizer >/dev/null 2>&1; then
    if [[ -x /usr/local/cuda/bin/compute-sanitizer ]]; then
      export PATH=/usr/local/cuda/bin:$PATH
    else
      fail sanitize "no compute-sanitizer"
      return 1
    fi
  fi
  local tool env_args filter summary
  # shellcheck disable=SC2206
  local tests=($SANITIZE_TESTS)
  for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do
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
    run "sanitize-$tool" "${LIMIT_SANITIZE:-120}" "${MIN_SANITIZE:-45}" "$LOG_SAN" env "${env_args[@]}" \
      compute-sanitizer --tool "$tool" --error-exitcode 9 "${filter[@]}" \
      "$PY" -m pytest "${tests[@]}" -q -x -m cuda -k "$SANITIZE_K" -p no:cacheprovider
    ((STEP_RC == 99)) && continue
    if ((STEP_RC != 0 && ${#filter[@]} > 0)) && grep -qiE "unrecognized|unknown option|invalid (value|option)" "$TMP/sanitize-$tool.out"; then
      # An older compute-sanitizer without this filter syntax: check every kernel instead.
      forget_failure "sanitize-$tool"
      run "sanitize-$tool" "${LIMIT_SANITIZE:-120}" "${MIN_SANITIZE:-45}" "$LOG_SAN" compute-sanitizer \
        --tool "$tool" --error-exitcode 9 "$PY" -m pytest "${tests[@]}" -q -x -m cuda -k "$SANITIZE_K" \
        -p no:cacheprovider
      ((STEP_RC == 99)) && continue
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

# ---------------------------------------------------------------------------- kernels
step_kernels() {
  : >>"$LOG_BENCH"
  # shellcheck disable=SC2086
  run kernels "${LIMIT_KERNELS:-120}" "${MIN_KERNELS:-40}" "$LOG_BENCH" "$PY" benchmarks/bench_gpu_kernels.py \
    --markdown "$OUT/kernels.md" --json "$OUT/kernels.json" ${KERNELS_ARGS:---only ceilings}
  ((STEP_RC == 99)) && return 99
  local notes
  notes=$(timeout 60 "$PY" -c "import json, sys; print(json.load(open(sys.argv[1])).get('headline', ''))" \
    "$OUT/kernels.json" 2>/dev/null)
  [[ -z $notes ]] && notes=$(grep -v '^\s*$' "$TMP/kernels.out" | tail -n 1 | cut -c1-200)
  add_row kernels "$(status_of $STEP_RC)" "$STEP_SECONDS" "${notes:-no kernels.json}"
}

# ---------------------------------------------------------------------------- main
finish() { # output tails of failed steps, the kernel tables, the step table, the race table last
  local f
  for f in $EXCERPTS; do head -c 1500 "$f"; done
  if [[ -s $OUT/kernels.md ]]; then
    echo
    head -c 2500 "$OUT/kernels.md"
    echo
  fi
  write_summary
  echo
  cat "$SUMMARY"
  if [[ -s $OUT/e2e.md ]]; then
    echo
    head -c 6000 "$OUT/e2e.md"
  elif has_step e2e; then
    echo
    echo "(no race table: the e2e step wrote no e2e.md)"
  fi
}

on_signal() {
  trap - TERM INT HUP
  local during=""
  if [[ -n $CHILD ]]; then
    kill -TERM "$CHILD" 2>/dev/null
    cat "$TMP/$CHILD_STEP.out" >>"$CHILD_LOG" 2>/dev/null
    echo "=== $CHILD_STEP: interrupted after $((SECONDS - ${CHILD_T0:-0}))s" >>"$CHILD_LOG"
    during=" during $CHILD_STEP"
  fi
  add_row suite "interrupted (signal)$during" "$SECONDS" "the steps above ran; the rest did not"
  finish
  exit 143
}

trap 'rm -rf "$TMP"' EXIT
trap on_signal TERM INT HUP

echo "[$(elapsed)] gpu_suite: STEPS='$STEPS', device $DEVICE, OUT=$OUT, python=$PY, budget ${BUDGET}s"
step_wheels
built_checked=0
for step in $STEPS; do
  case $step in
    env) step_env ;;
    build) step_build build ;;
    tests | sanitize | kernels | e2e | profile)
      if ((!built_checked)) && ! has_step build && [[ $DEVICE != cpu ]]; then
        cuda_built || step_build build-auto
      fi
      built_checked=1
      "step_$step"
      ;;
    *) fail "$step" "unknown step; known: env build e2e profile tests sanitize kernels" ;;
  esac
done
finish
# Exit status: 0 only when every step that ran passed.
((${#FAILED[@]} == 0))
