#!/bin/bash
# Wheels for bench/gpu_run.sh on a GPU machine that cannot reach PyPI (the lent H200: Python 3.12 with JAX and
# CUDA 13 in its image, but no Keras). Run here, from the repo root; writes .whl/ (git-ignored):
#   bash bench/gpu_wheels.sh              # keras, namex, optree: what that image lacks
#   bash bench/gpu_wheels.sh NAME ...     # other packages of the `gpu` extra's closure
# Versions come from uv.lock (the `gpu` extra), so the GPU run uses the Keras that `make setup` installs.
# GPU_PY (default 3.12) and GPU_PLATFORMS (manylinux x86_64 tags) describe the target machine.
set -euo pipefail
cd "$(dirname "$0")/.."
uv=$(command -v .venv/bin/uv || command -v uv) || { echo "no uv: run make setup first" >&2; exit 1; }
names=("$@"); [ ${#names[@]} -gt 0 ] || names=(keras namex optree)
pins=$("$uv" export --frozen --no-hashes --no-header --no-emit-project --extra gpu --format requirements-txt -q)
platforms=${GPU_PLATFORMS:-manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64}
mkdir -p .whl
for name in "${names[@]}"; do
  pin=$(grep -i -E "^${name//[-_.]/[-_.]}==" <<<"$pins" | sed 's/ *;.*//' | head -1)
  [ -n "$pin" ] || { echo "$name is not in the gpu extra's closure in uv.lock" >&2; exit 1; }
  rm -f .whl/"${name//-/_}"-*.whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_PY:-3.12}" --implementation cp \
    $(printf -- '--platform %s ' $platforms) -d .whl "$pin"
done
ls -1 .whl
