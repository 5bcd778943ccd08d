#!/usr/bin/env bash
# Build for the local GPU, run the CUDA tests (plain and under compute-sanitizer)
# and the GPU benchmarks; logs and tables go to $OUT (default: bench_out/).
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
arch=${CUDA_ARCH:-90}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nvcc --version | tail -2; $PY -c "import torch; print('torch', torch.__version__, torch.version.cuda)"; } 2>&1 | tee "$OUT/env.txt"

TORCHFLUENCE_CUDA=ON $PY -m pip install --no-build-isolation --no-deps -q -e . \
  -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$arch" -Cbuild-dir=build/gpu > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
$PY -c "import torchfluence as t; print(t.build_info())"

$PY -m pytest tests -q -x ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/tests.log" | tail -15
if [ "${SANITIZE:-1}" = 1 ]; then
  for tool in memcheck racecheck; do
    timeout 300 compute-sanitizer --tool $tool --error-exitcode 9 $PY -m pytest tests/test_influence_block.py -q -x \
      -k "cuda and (exact_with_ties or random_data or offsets)" > "$OUT/sanitizer_$tool.log" 2>&1
    echo "compute-sanitizer $tool: exit $? ($(grep -c 'ERROR SUMMARY: 0' "$OUT/sanitizer_$tool.log") clean summaries)"
    grep -m3 -E "ERROR SUMMARY|Invalid|Race" "$OUT/sanitizer_$tool.log"
    # The psg_dot and linear-head kernels on their smaller test shapes.
    timeout 300 compute-sanitizer --tool $tool --error-exitcode 9 $PY -m pytest tests/test_psg_dot.py \
      tests/test_head.py -q -x -k "cuda and (kernel or linear_head)" > "$OUT/sanitizer_fused_$tool.log" 2>&1
    echo "compute-sanitizer $tool (fused kernels): exit $?"
    grep -m3 -E "ERROR SUMMARY|Invalid|Race" "$OUT/sanitizer_fused_$tool.log"
  done
fi
for bench in ${BENCHES:-bench_influence_block bench_psg_dot bench_head}; do
  $PY benchmarks/$bench.py --device cuda --markdown "$OUT/$bench.md" 2>&1 | tail -20
done
