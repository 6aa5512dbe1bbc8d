#!/bin/bash
# Figure 4 on a lent GPU machine (Python 3.12, JAX with CUDA, PyTorch; no TensorFlow, no Keras).
# From the repo root here, with the cp312 wheels of keras 3.15.1, namex and optree in .whl/ (git-ignored):
#   run(command="bash bench/gpu_run.sh", carry=[".whl"], timeout_s=540)
# Extra arguments go to bench/gpu_bench.py (e.g. --n 6144 --batch 512 --skip torch-compile).
# Results: one RESULT line per variant, and $OUT/gpu_bench.json when $OUT is set.
set -u
cd "$(dirname "$0")/.." || exit 1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
  python3 -c "import keras" 2>/dev/null || { echo "no .whl/*.whl and no keras: carry the keras, namex and optree wheels in .whl/" >&2; exit 1; }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false KERAS_BACKEND=jax TF_CPP_MIN_LOG_LEVEL=2
timeout "${GPU_BENCH_TIMEOUT:-500}" python3 -m bench.gpu_bench "$@"
