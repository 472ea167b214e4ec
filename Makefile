# focalserve: two commands on a fresh machine.
#   make serve   set up .venv, generate stubs, start the service (CPU by default, GPU where CuPy sees one)
#   make test    the same set-up, then the whole test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PROTO  := proto/focalloss/v1/focal_loss.proto
STUBS  := client/focalloss/v1/focal_loss_pb2.py
DEPS   := $(VENV)/.deps-installed
READY  := $(VENV)/.installed
PYTEST_ARGS ?=

# glibc's default allocator returns every large buffer to the kernel and page-faults it back on the next
# request; keeping freed memory mapped makes large messages 2-3x faster (PERFORMANCE.md, README "Memory").
# One arena: a thread's own arena cannot hold a block over 64 MiB and maps a fresh one for each.
export MALLOC_MMAP_MAX_ ?= 0
export MALLOC_TRIM_THRESHOLD_ ?= 68719476736
export MALLOC_ARENA_MAX ?= 1

BENCH_VENV := .venv-bench
FW_VENV    := .venv-frameworks

.PHONY: serve test setup stubs clean bench bench-cpu bench-service frameworks bench-frameworks

serve: setup
	$(PY) -m focalserve $(ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

setup: $(READY)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS): requirements.lock | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	touch $@

# The two distributions, editable, after the stubs they package exist; this also compiles the server's CPU
# kernel (server/setup.py, g++), again whenever its source changes.
$(READY): $(DEPS) $(STUBS) client/pyproject.toml server/pyproject.toml server/setup.py server/focalserve/backends/focal_loss_cpu.cpp
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e client -e server
	touch $@

stubs: $(STUBS)

# Stubs live in client/focalloss/v1 so that `import focalloss.v1.focal_loss_pb2` matches the proto package.
$(STUBS): $(PROTO) $(DEPS)
	$(PY) -m grpc_tools.protoc -Iproto \
	  -I"$$($(PY) -c 'import google.rpc.status_pb2 as m, pathlib; print(pathlib.Path(m.__file__).parents[2])')" \
	  --plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy --plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc \
	  --python_out=client --grpc_python_out=client --mypy_out=client --mypy_grpc_out=client $(PROTO)
	touch client/focalloss/__init__.py client/focalloss/v1/__init__.py

# Benchmarks (BENCHMARKS.md): the CPU kernel against PyTorch and PaddlePaddle needs both, in a venv of their own.
bench: bench-cpu bench-service

bench-cpu: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python benchmarks/cpu_kernel.py $(BENCH_ARGS)

bench-service: setup
	$(PY) benchmarks/service.py $(BENCH_ARGS)

$(BENCH_VENV)/.installed: requirements.lock requirements-bench.txt $(STUBS)
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.lock -r requirements-bench.txt
	$(BENCH_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e client -e server
	touch $@

# PaddlePaddle and PyTorch (CPU) for the drop-ins (README "Use it from PaddlePaddle / PyTorch"): their tests
# (tests/test_frameworks.py builds this venv through this target), examples/ and benchmarks/frameworks.py.
frameworks: $(FW_VENV)/.installed

bench-frameworks: $(FW_VENV)/.installed
	$(FW_VENV)/bin/python benchmarks/frameworks.py $(BENCH_ARGS)

$(FW_VENV)/.installed: requirements.lock requirements-frameworks.lock $(STUBS) client/pyproject.toml server/pyproject.toml server/setup.py server/focalserve/backends/focal_loss_cpu.cpp
	$(PYTHON) -m venv $(FW_VENV)
	$(FW_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-frameworks.lock
	$(FW_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e client -e server
	touch $@

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(FW_VENV) client/focalloss build server/build *.egg-info client/*.egg-info server/*.egg-info server/focalserve/backends/*.so
