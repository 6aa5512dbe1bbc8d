#!/bin/bash
# Figure 4 on a GPU machine: Keras 3 on JAX with CUDA (no TensorFlow needed). Extra arguments go to
# bench/gpu_bench.py (e.g. --n 6144 --batch 512 --skip torch-compile, or --smoke).
# Results: one RESULT line per variant, and $OUT/gpu_bench.json when $OUT is set.
#
# Where JAX with CUDA comes from (the Python is $PYTHON, else .venv/bin/python when it sees a GPU, else python3):
#  * A GPU machine with PyPI: `make setup EXTRAS=gpu` installs pyproject's `gpu` extra (jax[cuda12], versions
#    from uv.lock) into .venv; then `bash bench/gpu_run.sh`.
#  * The lent H200 (no PyPI; Python 3.12 whose image has JAX with CUDA 13 and PyTorch, but no Keras): here,
#    `bash bench/gpu_wheels.sh` puts the locked keras, namex and optree wheels into .whl/ (git-ignored), then
#    run(command="bash bench/gpu_run.sh", carry=[".whl"], timeout_s=540)
set -u
cd "$(dirname "$0")/.." || exit 1
if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -x .venv/bin/python ] && .venv/bin/python -c "import jax; jax.devices('gpu')" >/dev/null 2>&1; then py=.venv/bin/python
else py=python3; fi
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
"$py" -c "import keras" 2>/dev/null || { echo "no keras for $py: carry .whl/ from bash bench/gpu_wheels.sh, or make setup EXTRAS=gpu" >&2; exit 1; }
"$py" -c "import jax; jax.devices('gpu')" >/dev/null 2>&1 || { echo "no JAX with CUDA (or no GPU) for $py: make setup EXTRAS=gpu on a machine with an NVIDIA GPU, or PYTHON=a Python that has it" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false KERAS_BACKEND=jax TF_CPP_MIN_LOG_LEVEL=2
timeout "${GPU_BENCH_TIMEOUT:-500}" "$py" -m bench.gpu_bench "$@"
