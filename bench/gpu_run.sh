#!/usr/bin/env bash
# Everything a GPU machine is for, in one go: build against its torch, run the test suite with
# the CUDA tests, `fastnorm check`, then the CUDA benchmark. Logs and results go to $1.
#   bench/gpu_run.sh OUTDIR [bench options...]     e.g. bench/gpu_run.sh /tmp/gpu --no-compile
# Steps are bounded by TEST_TIMEOUT / BENCH_TIMEOUT (seconds), so a hang still leaves logs.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bench/gpu_run.sh OUTDIR [bench options]}; shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv | tee "$out/gpu.txt"

t0=$SECONDS
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} FASTNORM_FORCE_CUDA=1 \
    $py -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 \
    || { tail -n 80 "$out/build.log"; exit 1; }
echo "build: $((SECONDS - t0)) s"
$py -m fastnorm info | tee "$out/info.txt"

# An error message that formats a number crashed the process on one such machine (an H200
# image whose compiler, CXX=/opt/gcc/bin/g++, links libstdc++ statically: a copy of it inside
# _C.so; setup.py now names torch's libstdc++ on the link line): check first, and print what
# the link looked like if it happens again.
$py -c "import torch, fastnorm
try:
    fastnorm.functional.batch_norm(torch.randn(4, 3, 5), None, None, torch.ones(4), None, training=True)
except RuntimeError as e:
    print('error path ok:', str(e).splitlines()[0][:100])" \
  || { echo "error path crashed"; $py -c "import sysconfig as s; print(s.get_config_var('LDSHARED'), s.get_config_var('LDFLAGS'))"
       ldd fastnorm/_C*.so; nm -C --defined-only fastnorm/_C*.so | grep -c 'std::basic_ostream'; }

# xdist (when there) keeps going past a test that crashes its worker, and is faster.
xdist=$($py -c "import xdist" 2>/dev/null && echo "-n 4")
t0=$SECONDS
timeout "${TEST_TIMEOUT:-300}" $py -m pytest -q -rfE -p no:cacheprovider $xdist ${TEST_ARGS:--k "cuda or cxx_runtime"} tests/ \
    > "$out/tests.log" 2>&1
echo "tests rc=$? in $((SECONDS - t0)) s"; tail -n 40 "$out/tests.log"
timeout 120 $py -m fastnorm check > "$out/check.log" 2>&1; echo "check rc=$?"; tail -n 15 "$out/check.log"

t0=$SECONDS
timeout "${BENCH_TIMEOUT:-300}" $py -m fastnorm bench --device cuda "$@" \
    --json "$out/bench.json" --markdown "$out/bench.md" > "$out/bench.log" 2>&1
echo "bench rc=$? in $((SECONDS - t0)) s"
grep -A40 "^- \|### weight norm" "$out/bench.md" | head -n 60
