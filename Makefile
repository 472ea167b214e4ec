# focalserve: two commands on a fresh machine.
#   make serve   set up .venv, generate stubs, start the service (CPU by default, GPU where CuPy sees one)
#   make test    the same set-up, then the whole test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PROTO  := proto/focalloss/v1/focal_loss.proto
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
# The stub generator (grpcio-tools 1.62: gencode every protobuf 4.25..7.x runtime accepts) and the client's
# oldest dependencies (the minimum-versions test); tests/test_packaging.py builds both through these targets.
PROTOC_VENV := .venv-protoc
MIN_VENV    := .venv-minversions
FW_VENV     := .venv-frameworks

.PHONY: serve test setup stubs clean bench bench-cpu bench-service bench-client protoc-venv minversions-venv \
        frameworks bench-frameworks

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

# The two distributions, editable; this also compiles the server's CPU kernel (server/setup.py, g++), again
# whenever its source changes.
$(READY): $(DEPS) client/pyproject.toml server/pyproject.toml server/setup.py server/focalserve/backends/focal_loss_cpu.cpp
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e client -e server
	touch $@

# The stubs in client/focalloss/v1 are committed (so that `pip install ./client` works on a fresh clone) and
# regenerated here after a change to the contract; tests/test_packaging.py fails while they differ from what
# this writes (`make stubs STUBS_OUT=dir` writes them elsewhere). They live in a top-level package named like
# the proto package, so that the generated `from focalloss.v1 import ...` works as protoc writes it.
# google/rpc/status.proto comes from client/node/protos.
STUBS_OUT ?= client
stubs: $(PROTOC_VENV)/.installed $(DEPS)
	$(PROTOC_VENV)/bin/python -m grpc_tools.protoc -Iproto -Iclient/node/protos \
	  --plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy --plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc \
	  --python_out=$(STUBS_OUT) --grpc_python_out=$(STUBS_OUT) --mypy_out=$(STUBS_OUT) --mypy_grpc_out=$(STUBS_OUT) $(PROTO)

protoc-venv: $(PROTOC_VENV)/.installed

$(PROTOC_VENV)/.installed: requirements-protoc.lock
	rm -rf $(PROTOC_VENV)
	$(PYTHON) -m venv $(PROTOC_VENV)
	$(PROTOC_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-protoc.lock
	touch $@

minversions-venv: $(MIN_VENV)/.installed

# The client itself is installed into it by the test, from the working tree, each run.
$(MIN_VENV)/.installed: requirements-minversions.lock
	rm -rf $(MIN_VENV)
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-minversions.lock
	touch $@

# Benchmarks (BENCHMARKS.md): the CPU kernel against PyTorch and PaddlePaddle needs both, in a venv of their own.
bench: bench-cpu bench-service

bench-cpu: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python benchmarks/cpu_kernel.py $(BENCH_ARGS)

bench-service: setup
	$(PY) benchmarks/service.py $(BENCH_ARGS)

# The public Python client API (and the Node.js client, where benchmarks/node_client.js exists) against the
# transport floor; BENCH_ARGS="--rounds N --split-bytes 256M" for a shorter run.
bench-client: setup
	$(PY) benchmarks/client.py $(BENCH_ARGS)

$(BENCH_VENV)/.installed: requirements.lock requirements-bench.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.lock -r requirements-bench.txt
	$(BENCH_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e client -e server
	touch $@

# Alert rules: deploy/prometheus/alerts.yml and deploy/k8s/prometheusrule.yaml from deploy/prometheus/thresholds.yml.
.PHONY: alerts
alerts: $(DEPS)
	$(PY) deploy/prometheus/render_alerts.py

# PaddlePaddle and PyTorch (CPU) for the drop-ins (README "Use it from PaddlePaddle / PyTorch"): their tests
# (tests/test_frameworks.py builds this venv through this target), examples/ and benchmarks/frameworks.py.
frameworks: $(FW_VENV)/.installed

bench-frameworks: $(FW_VENV)/.installed
	$(FW_VENV)/bin/python benchmarks/frameworks.py $(BENCH_ARGS)

$(FW_VENV)/.installed: requirements.lock requirements-frameworks.lock client/pyproject.toml server/pyproject.toml server/setup.py server/focalserve/backends/focal_loss_cpu.cpp
	$(PYTHON) -m venv $(FW_VENV)
	$(FW_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-frameworks.lock
	$(FW_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e client -e server
	touch $@

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(PROTOC_VENV) $(MIN_VENV) $(FW_VENV) build server/build *.egg-info client/*.egg-info server/*.egg-info server/focalserve/backends/*.so
