"""The contract guarded: `buf lint` (buf.yaml's rules and their documented exceptions) and `buf breaking` of
proto/ against the contract as first released, read from git history.

buf is the pinned `@bufbuild/buf` of tools/buf (the npm package ships the binary), installed with `npm ci`
on first use; skipped, with the reason, where npm is absent (as the Node.js client's tests are).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO

PROTO = "proto/focalloss/v1/focal_loss.proto"
# buf.yaml's modules: the contract and the google/rpc/status.proto it imports (vendored for Node.js).
VENDORED = "client/node/protos/google/rpc/status.proto"
BUF_DIR = REPO / "tools" / "buf"
NPM = shutil.which("npm")
NPM_TIMEOUT = 600

pytestmark = [
    pytest.mark.skipif(not NPM, reason="npm is not on PATH: buf (from the @bufbuild/buf npm package) cannot be installed"),
    pytest.mark.timeout(NPM_TIMEOUT + 300),
]


@pytest.fixture(scope="module")
def buf() -> Path:
    """tools/buf/node_modules/.bin/buf, installed from tools/buf/package-lock.json when missing."""
    binary = BUF_DIR / "node_modules" / ".bin" / "buf"
    if not binary.exists():
        r = subprocess.run([NPM, "ci", "--no-audit", "--no-fund"], cwd=BUF_DIR, capture_output=True, text=True,
                           timeout=NPM_TIMEOUT)
        assert r.returncode == 0, f"npm ci in {BUF_DIR} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0, version.stderr
    return binary


def _git(*args: str) -> str:
    r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"git {' '.join(args)}: {r.stderr}"
    return r.stdout


@pytest.fixture(scope="module")
def first_release(tmp_path_factory) -> Path:
    """A buf workspace holding the contract as its first commit added it (with buf.yaml and the vendored import)."""
    if not shutil.which("git") or not (REPO / ".git").exists():
        pytest.fail("buf breaking needs the git history of proto/ (a clone, not an export)")
    commits = _git("log", "--diff-filter=A", "--format=%H", "--", PROTO).split()
    assert commits, (f"no commit adding {PROTO} in the history: a shallow clone? "
                     f"(`git fetch --unshallow` gives buf breaking its baseline)")
    root = tmp_path_factory.mktemp("first-release")
    (root / PROTO).parent.mkdir(parents=True)
    (root / PROTO).write_text(_git("show", f"{commits[-1]}:{PROTO}"))
    (root / VENDORED).parent.mkdir(parents=True)
    shutil.copy(REPO / VENDORED, root / VENDORED)
    shutil.copy(REPO / "buf.yaml", root / "buf.yaml")
    return root


def _workspace(tmp_path: Path, contract: str) -> Path:
    """A copy of the repository's buf workspace with `contract` as the .proto."""
    (tmp_path / PROTO).parent.mkdir(parents=True)
    (tmp_path / PROTO).write_text(contract)
    (tmp_path / VENDORED).parent.mkdir(parents=True)
    shutil.copy(REPO / VENDORED, tmp_path / VENDORED)
    shutil.copy(REPO / "buf.yaml", tmp_path / "buf.yaml")
    return tmp_path


def _buf(buf: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(buf), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_buf_lint(buf):
    r = _buf(buf, REPO, "lint")
    assert r.returncode == 0, f"buf lint:\n{r.stdout}{r.stderr}"


def test_buf_lint_requires_every_comment(buf, tmp_path):
    contract = (REPO / PROTO).read_text()
    uncommented = contract.replace("  // The element type of `data`.\n", "")
    assert uncommented != contract
    r = _buf(buf, _workspace(tmp_path, uncommented), "lint")
    assert r.returncode != 0 and 'Field "dtype"' in r.stdout and "comment" in r.stdout, r.stdout + r.stderr


def test_buf_lint_exceptions_hold_for_the_first_release_only(buf, tmp_path):
    """buf.yaml's exceptions name the released file: a new file in the package gets every rule."""
    contract = (REPO / PROTO).read_text()
    root = _workspace(tmp_path, contract)
    options = "".join(line + "\n" for line in contract.splitlines() if line.startswith("option "))
    (root / PROTO).with_name("extra.proto").write_text(
        f'syntax = "proto3";\n\npackage focalloss.v1;\n\n{options}\n// A new enum.\nenum Mode {{\n  // The first.\n  AUTO = 0;\n}}\n')
    r = _buf(buf, root, "lint")
    assert r.returncode != 0, r.stdout + r.stderr
    assert 'Enum value name "AUTO" should be prefixed with "MODE_"' in r.stdout, r.stdout
    assert 'Enum zero value name "AUTO" should be suffixed with "_UNSPECIFIED"' in r.stdout, r.stdout
    assert "focal_loss.proto" not in r.stdout, r.stdout


def test_buf_breaking_against_first_release(buf, first_release):
    r = _buf(buf, REPO, "breaking", "--against", str(first_release))
    assert r.returncode == 0, f"proto/ breaks the contract as first released:\n{r.stdout}{r.stderr}"


@pytest.mark.parametrize("old, new, message", [
    ("  bytes data = 3;", "  bytes payload = 3;", 'Field "3" on message "Tensor" changed name from "data" to "payload"'),
    ("  bool compute_grad = 9;", "  bool compute_grad = 13;", 'Previously present field "9" with name "compute_grad"'),
    ("  DTYPE_BOOL = 8;", "  DTYPE_BOOLEAN = 8;", 'Enum value "8" on enum "DType" changed name from "DTYPE_BOOL"'),
    ("  rpc GetServerInfo(", "  rpc ServerInfo(", 'Previously present RPC "GetServerInfo"'),
])
def test_buf_breaking_fails_a_breaking_change(buf, first_release, tmp_path, old, new, message):
    contract = (REPO / PROTO).read_text()
    assert contract.count(old) == 1, old
    r = _buf(buf, _workspace(tmp_path, contract.replace(old, new)), "breaking", "--against", str(first_release))
    assert r.returncode != 0, f"buf breaking accepted {new.strip()!r}:\n{r.stdout}{r.stderr}"
    assert message in r.stdout, r.stdout + r.stderr
