"""The PaddlePaddle / PyTorch drop-ins, the Evaluator and examples/ (README "Use it from PaddlePaddle /
PyTorch").

Their tests need Paddle and torch, which the service's .venv does not have: this builds .venv-frameworks
(`make frameworks`, a few minutes the first time, nothing once built) and runs each file of
tests/frameworks/ in it with its own server. And `import focalserve_client` must work without either.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FW_PYTHON = REPO / ".venv-frameworks" / "bin" / "python"


@pytest.fixture(scope="session")
def frameworks_python() -> Path:
    done = subprocess.run(["make", "-s", "frameworks", f"PYTHON={os.environ.get('PYTHON', 'python3')}"],
                          cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, f"make frameworks failed:\n{(done.stdout + done.stderr)[-5000:]}"
    return FW_PYTHON


@pytest.mark.timeout(1800)  # the first run builds the venv: PaddlePaddle and torch are large downloads
@pytest.mark.parametrize("suite", ["fw_torch.py", "fw_paddle.py", "fw_evaluator.py", "fw_examples.py"])
def test_framework_suite(frameworks_python, suite):
    done = subprocess.run([str(frameworks_python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-W", "ignore::UserWarning", f"tests/frameworks/{suite}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{suite} failed in .venv-frameworks:\n{done.stdout[-8000:]}{done.stderr[-3000:]}"
    assert " passed" in done.stdout and " skipped" not in done.stdout, done.stdout[-2000:]


# Stands in for a venv without the frameworks whatever this one holds: any import of them fails.
NO_FRAMEWORKS = """
import importlib.abc, sys
class NoFrameworks(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "paddle"):
            raise ImportError(f"{name} is not installed here")
sys.meta_path.insert(0, NoFrameworks())
import focalserve_client
from focalserve_client import Evaluator, FocalLossClient
assert not {"torch", "paddle"} & set(sys.modules), sorted(sys.modules)
try:
    import focalserve_client.torch
except ImportError as e:
    print("drop-in needs torch:", e)
print("ok", Evaluator.__name__)
"""


def test_import_focalserve_client_without_paddle_or_torch():
    done = subprocess.run([sys.executable, "-c", NO_FRAMEWORKS], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["drop-in needs torch: torch is not installed here", "ok Evaluator"]
