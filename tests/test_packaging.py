"""The client as users install it: `pip install ./client` from the committed files alone, the wheel it builds,
stubs that match proto/, and the oldest dependency versions its metadata allows calling a real server.

Builds two small venvs through the Makefile (`make protoc-venv`, `make minversions-venv`, pinned by
requirements-protoc.lock and requirements-minversions.lock; pip's cache keeps them quick after the first run).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import REPO
from focalserve_client import FocalLossClient, FocalLossError

MIN_VENV = REPO / ".venv-minversions"
MIN_LOCK = REPO / "requirements-minversions.lock"
STUBS = REPO / "client" / "focalloss"
INSTALL_TIMEOUT = 900
# Packages only the server (or the code generator) needs: importing the client must load none of their modules.
# grpc's own __init__ imports the bare grpc_health, grpc_reflection and grpc_tools packages where they are
# installed (to alias them as grpc.health, ...): only their submodules count.
SERVER_ONLY = ("focalserve", "prometheus_client", "cupy", "grpc_health", "grpc_reflection", "grpc_tools")
LOADED = ("lambda m: m.split('.')[0] in SERVER_ONLY "
          "and not (m in ('grpc_health', 'grpc_reflection', 'grpc_tools'))")

pytestmark = pytest.mark.timeout(INSTALL_TIMEOUT + 300)


def _run(cmd: list, timeout: float = INSTALL_TIMEOUT, **kwargs) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


def _make(*args: str) -> None:
    _run(["make", "--no-print-directory", "-C", REPO, *args])


def _lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


@pytest.fixture(scope="module")
def client_source(tmp_path_factory) -> Path:
    """client/ as a fresh clone has it: the files git tracks (the Node.js client aside), nothing built."""
    dest = tmp_path_factory.mktemp("clone") / "client"
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--", "client"], capture_output=True,
                            timeout=60)
    files = [f for f in listed.stdout.decode().split("\0") if f and not f.startswith("client/node/")]
    assert listed.returncode == 0 and files, f"git ls-files client: {listed.stderr.decode()}"
    for f in files:
        if (REPO / f).is_file():  # a file deleted in the working tree but still tracked is left out
            (dest.parent / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dest.parent / f)
    return dest


def test_committed_stubs_match_proto(tmp_path):
    """The stubs `make stubs` writes from proto/ now are the committed ones, byte for byte."""
    out = tmp_path / "stubs"
    out.mkdir()
    _make("stubs", f"STUBS_OUT={out}")
    generated = {p.relative_to(out): p.read_bytes() for p in (out / "focalloss").rglob("*") if p.is_file()}
    committed = {p.relative_to(STUBS.parent): p.read_bytes() for p in STUBS.rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts and p.name != "__init__.py"}
    assert generated, "make stubs wrote nothing"
    assert sorted(generated) == sorted(committed), "stub files differ from what make stubs writes"
    stale = [str(name) for name in generated if generated[name] != committed[name]]
    assert not stale, f"{stale} differ from proto/: run `make stubs` and commit the result"
    assert (STUBS / "__init__.py").is_file() and (STUBS / "v1" / "__init__.py").is_file()


def test_stubs_are_old_gencode():
    """protobuf 4.25 gencode: no runtime version check, so every runtime from 4.25 to 7.x loads it."""
    text = (STUBS / "v1" / "focal_loss_pb2.py").read_text()
    assert re.search(r"^# Protobuf Python Version: 4\.25\.\d+$", text, re.M), text[:300]
    assert "ValidateProtobufRuntimeVersion" not in text
    assert "GRPC_GENERATED_VERSION" not in (STUBS / "v1" / "focal_loss_pb2_grpc.py").read_text()


@pytest.mark.parametrize("protobuf, common_protos", [("5.26.0", "1.75.0"), ("6.30.0", "1.75.0")])
def test_stubs_load_on_each_protobuf_major(tmp_path, protobuf, common_protos):
    """The first release of the majors between the oldest (.venv-minversions) and the newest (.venv) runtime:
    the stubs load without a warning and a request survives a round trip."""
    target = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
          "--target", target, f"protobuf=={protobuf}", f"googleapis-common-protos=={common_protos}"])
    script = ("import google.protobuf\n"
              "from focalloss.v1 import focal_loss_pb2 as pb\n"
              "r = pb.ComputeRequest(alpha=0.5, logit=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2], data=bytes(8)))\n"
              "back = pb.ComputeRequest.FromString(r.SerializeToString())\n"
              "assert back == r and back.HasField('alpha') and not back.HasField('gamma')\n"
              "print(google.protobuf.__version__)\n")
    # -S: no site-packages, so nothing but this protobuf, its googleapis protos and the stubs is importable
    r = _run([sys.executable, "-S", "-W", "error", "-c", script], timeout=60,
             env={**os.environ, "PYTHONPATH": f"{target}{os.pathsep}{STUBS.parent}"})
    assert r.stdout.strip() == protobuf


def test_lower_bounds_are_the_tested_minimum():
    """client/pyproject.toml's lower bounds and requirements-minversions.lock name the same versions."""
    deps = tomllib.loads((REPO / "client" / "pyproject.toml").read_text())["project"]["dependencies"]
    bounds = {}
    for dep in map(Requirement, deps):
        lower = [s.version for s in dep.specifier if s.operator == ">="]
        assert len(lower) == 1, f"{dep}: one lower bound expected"
        bounds[canonicalize_name(dep.name)] = Version(lower[0])
    pins = {name: Version(v) for name, v in _lock(MIN_LOCK).items()}
    assert bounds == pins, f"pyproject lower bounds {bounds} != {MIN_LOCK.name} {pins}"
    assert bounds["protobuf"] <= Version("4.25") and bounds["grpcio"] <= Version("1.62")


def test_importing_the_client_loads_no_server_module():
    r = _run([sys.executable, "-c", f"import sys, focalserve_client, focalserve_client.cli\nSERVER_ONLY = {SERVER_ONLY!r}\n"
              f"print(sorted(filter({LOADED}, sys.modules)))"], timeout=60)
    assert r.stdout.strip() == "[]", r.stdout


def test_wheel_from_a_fresh_clone(client_source, tmp_path):
    """`pip wheel` with plain pip (isolated build) from the committed files: the stubs and type stubs inside."""
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
          "--wheel-dir", tmp_path, client_source])
    wheels = list(tmp_path.glob("focalserve_client-*.whl"))
    assert len(wheels) == 1, list(tmp_path.iterdir())
    names = set(zipfile.ZipFile(wheels[0]).namelist())
    for name in ("focalloss/__init__.py", "focalloss/v1/__init__.py", "focalloss/v1/focal_loss_pb2.py",
                 "focalloss/v1/focal_loss_pb2_grpc.py", "focalloss/v1/focal_loss_pb2.pyi",
                 "focalserve_client/__init__.py", "focalserve_client/client.py", "focalserve_client/cli.py"):
        assert name in names, f"{name} not in {wheels[0].name}: {sorted(names)}"
    assert not any(n.startswith(("focalserve/", "server/", "node/")) for n in names), sorted(names)


@pytest.fixture(scope="module")
def min_venv(client_source) -> Path:
    """.venv-minversions (the oldest allowed dependencies) with the client installed by plain `pip install`
    of a fresh clone's client/, its dependencies resolved against the lock, from this working tree each run."""
    _make("minversions-venv")
    python = MIN_VENV / "bin" / "python"
    _run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--constraint", MIN_LOCK,
          client_source])
    return python


def test_installed_versions_are_the_minimum(min_venv):
    """pip changed nothing: the venv holds exactly the lock's versions and the client (no server package)."""
    r = _run([min_venv, "-m", "pip", "list", "--format=json", "--disable-pip-version-check"], timeout=120)
    installed = {canonicalize_name(p["name"]): p["version"] for p in json.loads(r.stdout)}
    assert installed.pop("focalserve-client") == "0.2.0"
    for tool in ("pip", "setuptools", "wheel"):
        installed.pop(tool, None)
    assert installed == _lock(MIN_LOCK)


MIN_SCRIPT = r"""
import importlib.util, json, sys
import google.protobuf, grpc, numpy as np
import focalserve_client
from focalserve_client import FocalLossClient, FocalLossError, StreamSummary
from batches import batches, example

out = {"versions": [google.protobuf.__version__, grpc.__version__, np.__version__],
       "client_file": focalserve_client.__file__,
       "loaded": sorted(filter(LOADED, sys.modules)),
       "installed": [m for m in SERVER_ONLY if importlib.util.find_spec(m) is not None]}
with FocalLossClient(sys.argv[1]) as client:
    r = client.compute(*example(), normalizer=2.0, compute_grad=True)
    out["compute"] = [np.asarray(r.loss).tolist(), r.grad.tolist(), str(r.loss.dtype), r.backend]
    items = list(client.stream(batches()))
    out["stream"] = [np.asarray(i.loss).tolist() for i in items[:-1]]
    s = items[-1]
    assert isinstance(s, StreamSummary), s
    out["summary"] = [s.items, s.failed_items, s.elements, s.positives, s.loss_sum]
    try:
        client.compute(*example(), alpha=2.0)
        out["error"] = None
    except FocalLossError as e:
        out["error"] = [e.code.name, [list(v) for v in e.violations]]
    out["max_message_bytes"] = client.server_info().max_message_bytes
print(json.dumps(out))
"""

BATCHES = r"""
import numpy as np

def example():
    return (np.array([[0.97, 0.91, 0.03], [0.55, 0.43, 0.71]], np.float32),
            np.array([[1.0, 0, 0], [0, 1, 0]], np.float32))

def batches():
    rng = np.random.default_rng(12)
    out = []
    for n in (5, 1000, 3):
        out.append({"logit": rng.normal(0, 3, (n, 4)).astype(np.float64),
                    "label": rng.integers(0, 5, (n, 1)).astype(np.int32), "label_format": "class_index",
                    "reduction": "none"})
    out.append({"logit": rng.normal(0, 3, 40).astype(np.float32),
                "label": (rng.random(40) < 0.3).astype(np.float32), "gamma": 0.5})
    return out
"""


def test_minimum_versions_call_a_real_server(min_venv, server, tmp_path):
    """The client on protobuf 4.25, grpcio 1.62 and the other oldest dependencies: compute with a gradient,
    a stream with its summary, a refusal with its field violation and GetServerInfo, bit-identical to what
    the newest versions (this venv) get from the same server."""
    (tmp_path / "batches.py").write_text(BATCHES)
    script = tmp_path / "calls.py"
    script.write_text(f"SERVER_ONLY = {SERVER_ONLY!r}\nLOADED = {LOADED}\n" + MIN_SCRIPT)
    r = _run([min_venv, script, server.target], timeout=120,
             cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    got = json.loads(r.stdout)
    assert got["versions"][:2] == [_lock(MIN_LOCK)["protobuf"], _lock(MIN_LOCK)["grpcio"]], got["versions"]
    assert got["client_file"].startswith(str(MIN_VENV)), f"client imported from {got['client_file']}"
    assert got["loaded"] == [] and got["installed"] == [], got

    sys.path.insert(0, str(tmp_path))
    try:
        import batches as reference
    finally:
        sys.path.remove(str(tmp_path))
    with FocalLossClient(server.target) as client:
        r = client.compute(*reference.example(), normalizer=2.0, compute_grad=True)
        assert got["compute"] == [np.asarray(r.loss).tolist(), r.grad.tolist(), "float32", r.backend]
        assert f"{got['compute'][0]:.8g}" == "0.65782464"
        items = list(client.stream(reference.batches()))
        assert got["stream"] == [np.asarray(i.loss).tolist() for i in items[:-1]]
        s = items[-1]
        assert got["summary"] == [s.items, s.failed_items, s.elements, s.positives, s.loss_sum]
        assert got["summary"][:3] == [4, 0, 20 + 4000 + 12 + 40]
        with pytest.raises(FocalLossError) as e:
            client.compute(*reference.example(), alpha=2.0)
        assert got["error"] == [e.value.code.name, [list(v) for v in e.value.violations]]
        assert got["error"][0] == "INVALID_ARGUMENT" and any(f == "alpha" for f, _ in got["error"][1]), got["error"]
        assert got["max_message_bytes"] == client.server_info().max_message_bytes > 0
