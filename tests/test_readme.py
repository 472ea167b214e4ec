"""The README, executed: its marked code blocks run against a real server, and the claims that a test can
check cheaply (figures, flags, metrics, make targets, paths, the client's API) are checked against the code.

Marking a block in README.md: an HTML comment (invisible on GitHub) on the line right before its fence.

    <!-- readme-test: python -->            run the next fenced block with the suite's Python (the .venv)
    <!-- readme-test: sh -->                run it with bash: every command line must succeed
    <!-- readme-test: node -->              save it as a .js file in the repository root and run it with node
                                            (client/node's packages are installed first, as for test_node_client)
    <!-- readme-test: output -->            the next fenced block is what the runnable block before it prints on
                                            stdout: compared line by line (trailing spaces ignored); `...` inside a
                                            line matches any text, a line that is only `...` any number of lines
    <!-- readme-test: skip REASON -->       not run, for the reason given (a server that never exits, ...)

`needs=TOOL,TOOL` after the kind (e.g. `<!-- readme-test: sh needs=node,npm -->`) skips the block, with the
reason, where a tool is not on PATH. Every fenced block in a shell, Python or JavaScript language must carry a
marker (a run kind or `skip REASON`), so a new example is either run or consciously left out. ```promql blocks
need none: test_operations.py sends each of their lines to a real Prometheus (promql_examples()).

A block runs in a scratch directory that mirrors the repository root (one symlink per entry, `.venv` pointing
at the environment running the suite), so relative paths work as in a checkout and the files a block writes
land in the scratch directory; `localhost:50051` in the block is replaced by the address of a test server
(the CPU backend, whose output the README shows), FOCALSERVE_TARGET is set to it, and `.venv/bin` comes first
on PATH. What a block writes through a linked directory lands in the checkout (`npm ci` in client/node
installs its node_modules, as test_node_client.py does).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from conftest import REPO, free_port, metrics_text, start_server
from focalserve_client import FocalLossClient, FocalLossError
from focalserve_client import client as client_module
from test_node_client import node_modules  # noqa: F401  (the fixture: npm ci on first use)

README = REPO / "README.md"
README_TARGET = "localhost:50051"
RUN_KINDS = ("python", "sh", "node")
MARKER = re.compile(r"^<!--\s*readme-test:\s*(\S+)\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^ {0,3}(```+|~~~+)\s*([\w+-]*)")  # indented up to 3 spaces: still a fence
# Fenced blocks in these languages are examples a reader would run: each needs a marker.
RUNNABLE_LANGS = {"python", "py", "python3", "sh", "bash", "shell", "console", "js", "javascript", "node", "mjs"}
BLOCK_TIMEOUT = 240  # the sh block of the Node.js section runs `npm ci`


@dataclasses.dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    kind: str | None = None  # the marker's kind, None where unmarked
    args: str = ""
    output: "Block | None" = None

    @property
    def needs(self) -> list[str]:
        m = re.search(r"\bneeds=(\S+)", self.args)
        return (m.group(1).split(",") if m else []) + (["node"] if self.kind == "node" else [])

    @property
    def id(self) -> str:
        return f"{self.kind}@L{self.line}"


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block of `text`, with its marker and, for a runnable one, the output block after it."""
    lines = text.splitlines()
    blocks: list[Block] = []
    marker: tuple[str, str] | None = None
    i = 0
    while i < len(lines):
        m = MARKER.match(lines[i])
        if m:
            marker = (m.group(1), m.group(2))
            i += 1
            continue
        f = FENCE.match(lines[i])
        if f:
            fence, start = f.group(1), i
            i += 1
            body = []
            while i < len(lines) and not lines[i].lstrip().startswith(fence):
                body.append(lines[i])
                i += 1
            block = Block(start + 1, f.group(2).lower(), "\n".join(body) + "\n")
            if marker:
                block.kind, block.args = marker
            blocks.append(block)
        elif lines[i].strip():
            marker = None  # a marker applies only to the fence right after it
        i += 1
    last_run: Block | None = None
    for block in blocks:
        if block.kind in RUN_KINDS:
            last_run = block
        elif block.kind == "output":
            if last_run is not None and last_run.output is None:
                last_run.output = block
            else:  # left for test_every_example_is_marked to report: collection must not fail
                block.kind = "output without a runnable block before it"
    return blocks


BLOCKS = readme_blocks(README.read_text())
RUNNABLE = [b for b in BLOCKS if b.kind in RUN_KINDS]


def promql_examples() -> list[str]:
    """The queries of the README's ```promql blocks, comments dropped: test_operations.py runs them on a real
    Prometheus scraping a real server."""
    return [re.sub(r"\s+#.*$", "", line).strip() for b in BLOCKS if b.lang == "promql"
            for line in b.code.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def output_matches(expected: str, actual: str) -> bool:
    def norm(s: str) -> list[str]:
        out = [line.rstrip() for line in s.splitlines()]
        while out and not out[-1]:
            out.pop()
        return out

    pattern = ""
    for line in norm(expected):
        if line.strip() == "...":
            pattern += r"(?:[^\n]*\n)*?"
        else:
            pattern += ".*?".join(re.escape(part) for part in line.split("...")) + r"\n"
    return re.fullmatch(pattern, "".join(line + "\n" for line in norm(actual)), re.S) is not None


def test_output_matching_rules():
    """The `...` rules the README's output blocks rely on, on known text (both ways)."""
    assert output_matches("a 1\n...\nz\n", "a 1\nb\nc\nz\n")
    assert output_matches("...\nz", "z\n\n")
    assert output_matches('{"v": "...", "n": 2}', '{"v": "0.1", "n": 2}   ')
    assert not output_matches("a 1\nz", "a 1\nb\nz")
    assert not output_matches('{"v": "...", "n": 2}', '{"v": "0.1", "n": 3}')
    assert not output_matches(" [1]", "[1]")  # leading spaces count (numpy's array layout)


def test_every_example_is_marked():
    unmarked = [f"README.md:{b.line} ({b.lang})" for b in BLOCKS if b.lang in RUNNABLE_LANGS and b.kind is None]
    assert not unmarked, (f"code blocks without a `<!-- readme-test: ... -->` marker (see {Path(__file__).name}'s "
                          f"docstring; `skip REASON` where one cannot run here): {unmarked}")
    unknown = [f"README.md:{b.line}: {b.kind}" for b in BLOCKS if b.kind not in (*RUN_KINDS, "output", "skip", None)]
    assert not unknown, f"unknown marker kinds: {unknown}"
    reasonless = [f"README.md:{b.line}" for b in BLOCKS if b.kind == "skip" and not b.args]
    assert not reasonless, f"`skip` markers without a reason: {reasonless}"


def test_examples_of_every_client_are_run():
    """Deleting a marker must not silently stop a client's example from being run, nor its output checked."""
    kinds = {b.kind for b in RUNNABLE if b.output is not None}
    assert kinds >= {"python", "sh", "node"}, f"runnable blocks with a checked output: {kinds}"
    cli = [b for b in RUNNABLE if "focalserve-client compute" in b.code and "focalserve-client stream" in b.code]
    assert cli, "the CLI block (compute and stream) is not marked to run"


@pytest.fixture(scope="module")
def cpu_server(tmp_path_factory):
    """The server the README's examples talk to: the CPU backend whatever FOCALSERVE_TEST_BACKEND says, since
    the output they show (backend names, devices) is a CPU server's, as `make serve` starts on most machines."""
    srv = start_server(tmp_path_factory.mktemp("readme"), "--backend", "cpu", "--workers", "2")
    yield srv
    assert srv.stop() == 0, srv.log()


def _scratch_root(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in (".git", ".venv"):
            (root / entry.name).symlink_to(entry)
    (root / ".venv").symlink_to(Path(sys.prefix))
    return root


def _each_line_must_succeed(script: str) -> str:
    """`script` with every command line (joined over trailing backslashes) ended by `|| exit`: `bash -e` alone
    goes on after a failure inside `a && b` that is not the last command."""
    out, pending = [], ""
    for line in script.splitlines():
        pending += line + "\n"
        if line.endswith("\\"):
            continue
        out.append(f"{{ {pending}}} || exit $?\n" if pending.strip() and not pending.lstrip().startswith("#")
                   else pending)
        pending = ""
    return "".join(out) + pending


def test_sh_lines_must_each_succeed(tmp_path):
    script = tmp_path / "s.sh"
    script.write_text(_each_line_must_succeed("true && false  # a comment\necho \\\n  reached\n"))
    result = subprocess.run(["bash", "-e", str(script)], capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (1, "")
    script.write_text(_each_line_must_succeed("# setup\ntrue && true  # a comment\necho \\\n  reached\n"))
    result = subprocess.run(["bash", "-e", str(script)], capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (0, "reached\n")


@pytest.mark.timeout(BLOCK_TIMEOUT + 60)
@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_readme_block(block: Block, cpu_server, tmp_path, request):
    missing = [tool for tool in block.needs if not shutil.which(tool)]
    if missing:
        pytest.skip(f"README.md:{block.line} needs {', '.join(missing)}, not on PATH")
    if block.kind == "node":
        request.getfixturevalue("node_modules")
    root = _scratch_root(tmp_path)
    code = block.code.replace(README_TARGET, cpu_server.target)
    script = root / {"python": "readme_block.py", "sh": "readme_block.sh", "node": "readme_block.js"}[block.kind]
    script.write_text(_each_line_must_succeed(code) if block.kind == "sh" else code)
    command = {"python": [sys.executable], "sh": ["bash", "-e"], "node": ["node"]}[block.kind] + [script.name]
    env = {**os.environ, "FOCALSERVE_TARGET": cpu_server.target,
           "PATH": f"{Path(sys.prefix) / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"README.md:{block.line} did not finish in {BLOCK_TIMEOUT}s:\n{e.stdout}\n{e.stderr}")
    shown = f"--- README.md:{block.line} ---\n{code}--- stdout ---\n{result.stdout}--- stderr ---\n{result.stderr}"
    if result.returncode != 0:
        pytest.fail(f"the block exited with {result.returncode}\n{shown}", pytrace=False)
    if block.output is not None and not output_matches(block.output.code, result.stdout):
        pytest.fail(f"its output is not what README.md:{block.output.line} shows:\n{block.output.code}{shown}",
                    pytrace=False)


# ---- claims in the prose, each checked against the running service or the code ----

def _readme() -> str:
    return README.read_text()


def _significant(text: str) -> int:
    return len(re.sub(r"^0+", "", re.sub(r"[eE].*$|[.\-+]", "", text)))


def test_tail_precision_figure(server):
    """`x = 17, y = 1, γ = 0` gives F: F is the service's value rounded to the digits F shows, in both dtypes."""
    m = re.search(r"`x = 17, y = 1, γ = 0` gives ([0-9.eE+-]+)", _readme())
    assert m, "the README no longer states the x = 17 figure this test checks"
    shown = m.group(1)
    digits = _significant(shown)
    with FocalLossClient(server.target) as client:
        for dtype in (np.float32, np.float64):
            loss = float(client.compute(np.array([17.0], dtype), np.array([1.0], dtype), gamma=0.0).loss)
            assert float(f"{loss:.{digits - 1}e}") == float(shown), f"{dtype.__name__}: {loss!r}, README {shown}"


def test_saturation_example(server):
    """`x = -1e4` gives `2500` for α = 0.25 (a positive: α·|x| where the legacy op saturates)."""
    m = re.search(r"`x = (-1e4)` gives `(\d+)` for α = ([0-9.]+)", _readme())
    assert m, "the README no longer states the x = -1e4 example this test checks"
    with FocalLossClient(server.target) as client:
        for dtype in (np.float32, np.float64):
            r = client.compute(np.array([float(m.group(1))], dtype), np.array([1.0], dtype), alpha=float(m.group(3)))
            assert float(r.loss) == float(m.group(2)), f"{dtype.__name__}: {float(r.loss)!r}"


def test_error_message_example(server):
    """Errors: the message starts with the field, as in the README's example, and BadRequest names it."""
    m = re.search(r"starts with the field \(`((\w+): must be .*?, got ([0-9.]+))`\)", _readme())
    assert m, "the README no longer shows the example error message this test checks"
    message, field, value = m.groups()
    with FocalLossClient(server.target) as client, pytest.raises(FocalLossError) as e:
        client.compute(np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32), **{field: float(value)})
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.message.startswith(message), e.value.message
    assert field in [f for f, _ in e.value.violations], e.value.violations


def _table(section: str) -> list[list[str]]:
    """The rows of the first Markdown table after heading `section`, cells stripped, header row dropped."""
    text = _readme()
    start = text.index(f"\n## {section}\n")
    rows = []
    for line in text[start:].splitlines()[2:]:
        if line.startswith("|"):
            rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
        elif rows:
            break
    return [r for r in rows[1:] if not set("".join(r)) <= set("-: ")]


def _ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def test_flag_table_matches_the_parser(monkeypatch):
    """Running it: every flag in the table exists with the default it states and reads the environment
    variable it names; every flag of `python -m focalserve --help` is in the table."""
    from focalserve import config

    for name in [k for k in os.environ if k.startswith("FOCALSERVE_")]:
        monkeypatch.delenv(name)
    defaults = config.parse_args([])
    help_text = subprocess.run([sys.executable, "-m", "focalserve", "--help"], capture_output=True, text=True,
                               check=True).stdout
    listed = set()
    for row in _table("Running it"):
        flags, envs = _ticked(row[0]), _ticked(row[1])
        envs = [e if e.startswith("FOCALSERVE_") else envs[0].rsplit("_", 1)[0] + e for e in envs]  # `_KEY`
        assert flags and len(envs) in (1, len(flags)), row
        for flag, env in zip(flags, envs * len(flags) if len(envs) == 1 else envs):
            listed.add(flag)
            assert re.search(rf"(^|\s){re.escape(flag)}\b", help_text, re.M), f"{flag} not in --help"
            field = flag[2:].replace("-", "_")
            default = getattr(defaults, field if flag != "--auth-token-file" else "auth_token")
            choices = re.search(rf"{re.escape(flag)} \{{([^}}]+)\}}", help_text)
            if flag == "--auth-token-file":  # the environment holds the token itself, not a file name
                field, value, expected = "auth_token", "s3cret", ("s3cret",)
            elif isinstance(default, bool):
                value, expected = "1", ("True",)
            elif choices:  # an enum: any choice but the default
                value = next(c for c in choices.group(1).split(",") if c != default)
                expected = (value,)
            else:
                value, expected = "7", ("7", "7.0")
            if field.startswith("tls_"):  # the key goes with the certificate, a client CA needs both, an
                monkeypatch.setenv("FOCALSERVE_TLS_CERT", "c.pem")  # allow list needs a client CA
                monkeypatch.setenv("FOCALSERVE_TLS_KEY", "k.pem")
                if field == "tls_client_allow":
                    monkeypatch.setenv("FOCALSERVE_TLS_CLIENT_CA", "ca.pem")
            monkeypatch.setenv(env, value)
            got = getattr(config.parse_args([]), field)
            if isinstance(got, tuple):  # a list flag (comma-separated)
                got = ",".join(got)
            assert str(got) in expected, f"{env}={value}: {field} = {got!r}"
            for name in [k for k in os.environ if k.startswith("FOCALSERVE_")]:
                monkeypatch.delenv(name)
            stated = row[2].strip("`").split(" ")[0]
            if stated == "off":
                assert default in (False, "", ()), f"{flag}: default {default!r}, README says off"
            elif stated == "CPU":  # "CPU count"
                assert default == os.cpu_count(), f"{flag}: default {default!r}, README says CPU count"
            else:
                assert str(default) in (stated.strip("`"), f"{stated.strip('`')}.0"), \
                    f"{flag}: default {default!r}, README says {row[2]}"
    in_help = set(re.findall(r"^\s+(--[a-z][\w-]*)", help_text, re.M)) - {"--help"}
    assert in_help - listed == set(), f"flags missing from the README's table: {sorted(in_help - listed)}"


def test_metrics_table_matches_metrics(tmp_path):
    """Metrics: every metric in the table is exposed with the type and labels it states; every focalloss_ and
    grpc_server_ metric exposed is in the table; the bucket ranges stated hold."""
    port = free_port()
    srv = start_server(tmp_path, "--workers", "1", "--metrics-host", "127.0.0.1", "--metrics-port", str(port))
    try:
        with FocalLossClient(srv.target) as client:
            client.compute(np.array([[0.5, -1.0]], np.float32), np.array([[1.0, 0.0]], np.float32))
        text = metrics_text(port)
    finally:
        srv.stop()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    listed = set()
    previous_labels: list[str] = []
    for row in _table("Metrics"):
        names, kind = _ticked(row[0]), row[1].split(" ")[0]
        # `a, b`; `kind=used\|total` (a label and its values); `same` (+ `c`): the row above's labels (and c)
        labels = (previous_labels if row[2].startswith("same") else []) + [
            re.sub(r"=.*", "", x).strip() for cell in _ticked(row[2]) for x in cell.split(",")]
        previous_labels = labels
        for name in names:
            listed.add(name)
            assert types.get(name) == kind, f"{name}: exposed as {types.get(name)}, README says {kind}"
            samples = re.findall(rf"^{re.escape(name)}(?:_bucket|_count|_sum)?(?:{{(.*?)}})? ", text, re.M)
            for sample_labels in samples:
                got = set(re.findall(r"(\w+)=", sample_labels or "")) - {"le"}
                assert got == set(labels), f"{name}: labels {sorted(got)}, README says {labels}"
    # prometheus_client adds a `_created` gauge per counter and histogram: its own, not one to document
    exposed = {n for n in types if n.startswith(("focalloss_", "grpc_server_")) and not n.endswith("_created")}
    assert exposed - listed == set(), f"metrics missing from the README's table: {sorted(exposed - listed)}"

    def bucket_range(name: str) -> tuple[float, float]:
        bounds = {float(b) for b in re.findall(rf'^{name}_bucket{{.*?le="([^"]+)"', text, re.M)} - {float("inf")}
        return min(bounds), max(bounds)

    rows = {_ticked(r[0])[0]: r[3] for r in _table("Metrics")}
    assert "100 µs to 60 s" in rows["grpc_server_handling_seconds"]
    assert bucket_range("grpc_server_handling_seconds") == (1e-4, 60.0)
    assert "1 KiB to 256 MiB" in rows["focalloss_request_bytes"]
    assert bucket_range("focalloss_request_bytes") == (1024.0, 256.0 * 2**20)


def test_make_targets_exist():
    """Every `make TARGET` the README names is a target of the Makefile, `make serve ARGS=...` hands the flags
    to the server, and the Makefile exports the allocator settings the README says `make serve` sets."""
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+(?: [\w-]+)*):", makefile, re.M))
    targets = {t for line in targets for t in line.split()}
    named = set(re.findall(r"\bmake ([a-z][\w-]*)", _readme()))
    assert named, "the README names no make target"
    assert named - targets == set(), f"make targets the README names but the Makefile lacks: {named - targets}"
    serve = re.search(r'`make serve ARGS="([^"]+)"`', _readme())
    assert serve, "the README no longer shows how `make serve` takes flags"
    dry = subprocess.run(["make", "-n", "--no-print-directory", "serve", f"ARGS={serve.group(1)}"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert dry.returncode == 0 and dry.stdout.rstrip().splitlines()[-1].endswith(
        f"-m focalserve {serve.group(1)}"), dry.stdout + dry.stderr
    for name, value in re.findall(r"`(MALLOC_\w+)=(\d+)`", _readme()):
        assert re.search(rf"^export {name} \?= {value}$", makefile, re.M), f"{name}={value} not set by the Makefile"


def test_named_paths_exist():
    """Every repository path the README names (in backticks, links or the Layout block) exists."""
    text = _readme()
    candidates = set(re.findall(r"`([\w.-]+(?:/[\w.-]+)+/?)`", text))
    candidates |= set(re.findall(r"\]\(([\w.-]+(?:/[\w.-]+)+/?)\)", text))
    layout = text[text.index("\n## Layout\n"):]
    candidates |= set(re.findall(r"^([\w.-]+(?:/[\w.-]*)+)\s", layout[layout.index("```"):], re.M))
    candidates |= {p.strip(",") for p in re.findall(r"^([\w.-]+, [\w.-]+)\s", layout, re.M)
                   for p in p.split(", ")}
    # not repository paths: outside the repository (../shared), a proto import every gRPC distribution ships
    # (google/rpc/status.proto) and resource names (nvidia.com/gpu)
    paths = {c for c in candidates
             if not c.startswith(("..", "google/")) and not re.match(r"[\w-]+\.[a-z]+/", c)}
    assert len(paths) >= 20, f"too few paths found, the extraction broke: {sorted(paths)}"
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, f"paths the README names that do not exist: {missing}"


def test_python_client_api():
    """Use it from Python: compute()'s keywords, ComputeResult's and FocalLossError's fields, the default
    deadline, the client's dependencies and the retry policy (0.1 s doubling to 2 s, 5 attempts, UNAVAILABLE
    and CANCELLED) are the client's."""
    text = _readme()
    m = re.search(r"`compute\(logit, label, \*, (.*?)\)` returns", text, re.S)
    assert m, "the README no longer lists compute()'s keywords"
    stated = [re.sub(r"=.*", "", k).strip() for k in re.sub(r'"[^"]*"\|?', "", m.group(1)).split(",")]
    params = inspect.signature(FocalLossClient.compute).parameters
    assert [k for k in stated if k not in params] == [], stated
    result_fields = {f.name for f in dataclasses.fields(client_module.ComputeResult)}
    assert {"loss", "grad", "backend", "stats"} <= result_fields
    error = FocalLossError(grpc.StatusCode.INVALID_ARGUMENT, "alpha: bad", [("alpha", "bad")])
    assert (error.code, error.message, error.violations) == (grpc.StatusCode.INVALID_ARGUMENT, "alpha: bad",
                                                            [("alpha", "bad")])
    deadline = re.search(r"Every call has a deadline \(`timeout`, default (\d+) s\)", text)
    assert deadline, "the README no longer states the default deadline"
    assert inspect.signature(FocalLossClient).parameters["timeout"].default == float(deadline.group(1))
    needs = re.search(r"the distribution `focalserve-client`\) needs only (.*?), never the server's packages", text, re.S)
    assert needs, "the README no longer lists the client's dependencies"
    stated = {n.strip().lower() for n in re.split(r",|\band\b", needs.group(1).replace("\n", " ")) if n.strip()}
    pyproject = (REPO / "client" / "pyproject.toml").read_text()
    declared = re.search(r"^dependencies = \[(.*?)\]", pyproject, re.S | re.M).group(1)
    assert stated == {re.match(r"[\w.-]+", d).group(0).lower() for d in re.findall(r'"([^"]+)"', declared)}
    retry = re.search(r"exponential backoff \((\S+) s doubling to (\S+) s, (\d+) attempts\)", text)
    assert retry, "the README no longer states the retry policy"
    policy = json.loads(client_module.service_config())["methodConfig"][0]["retryPolicy"]
    assert policy["initialBackoff"] == f"{retry.group(1)}s" and policy["maxBackoff"] == f"{retry.group(2)}s"
    assert policy["backoffMultiplier"] == 2 and policy["maxAttempts"] == int(retry.group(3))
    assert inspect.signature(FocalLossClient).parameters["max_attempts"].default == int(retry.group(3))
    assert set(policy["retryableStatusCodes"]) == {"UNAVAILABLE", "CANCELLED"}


NODE_OPTIONS_PROBE = r"""
const { buildRequest } = require(process.argv[2]);
const base = () => ({ logit: new Float32Array([0.5, -1]), label: new Float32Array([1, 0]), shape: [1, 2] });
const plain = buildRequest(base());
const unread = [];
for (const option of JSON.parse(process.argv[3])) {
  // read: a value of the wrong kind is refused naming the option, or the option reaches the request
  let request;
  try {
    request = buildRequest({ ...base(), [option]: 'not-a-valid-value' });
  } catch (e) {
    if (!e.message.includes(`${option}:`)) unread.push(`${option} (${e.message})`);
    continue;
  }
  if (JSON.stringify(request[option]) !== JSON.stringify(plain[option])) continue;
  // a switch (e.g. narrowLabels) reads only `false`: turned off, the request it builds differs
  if (JSON.stringify(buildRequest({ ...base(), [option]: false })) === JSON.stringify(plain)) unread.push(option);
}
console.log(JSON.stringify(unread));
"""


@pytest.mark.skipif(not (shutil.which("node") and shutil.which("npm")),
                    reason="node and npm are not on PATH: the Node.js client is not tested")
def test_node_client_options_named(node_modules, tmp_path):  # noqa: F811
    """Use it from Node.js: every option the README lists is one the client reads (a wrong value is refused
    naming it, or it reaches the request)."""
    m = re.search(r"Options: (.*?)\.\n", _readme(), re.S)
    assert m, "the README no longer lists the Node.js client's options"
    options = [o for o in _ticked(m.group(1)) if re.fullmatch(r"[a-z]\w*", o)]
    assert len(options) >= 8, options
    probe = tmp_path / "probe.js"
    probe.write_text(NODE_OPTIONS_PROBE)
    result = subprocess.run(["node", str(probe), str(REPO / "client" / "node"), json.dumps(options)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [], f"options the README lists that the client ignores: {result.stdout}"


def test_defaults_views_and_empty_mean(server):
    """What it computes: the stated α and γ defaults are the service's; a single response's arrays are
    read-only views; MEAN over zero elements is NaN."""
    text = _readme()
    m = re.search(r"Defaults: α = ([0-9.]+), γ = ([0-9.]+)\.", text)
    assert m, "the README no longer states the α/γ defaults"
    alpha, gamma = float(m.group(1)), float(m.group(2))
    assert "MEAN over zero elements is NaN" in text and "read-only views of its bytes" in text
    rng = np.random.default_rng(15)
    logit = rng.normal(0, 3, (4, 5)).astype(np.float32)
    label = (rng.random((4, 5)) < 0.3).astype(np.float32)
    with FocalLossClient(server.target) as client:
        implicit = client.compute(logit, label, reduction="none", compute_grad=True)
        explicit = client.compute(logit, label, reduction="none", compute_grad=True, alpha=alpha, gamma=gamma)
        other = client.compute(logit, label, reduction="none", alpha=alpha, gamma=gamma + 1)
        np.testing.assert_array_equal(implicit.loss, explicit.loss)
        np.testing.assert_array_equal(implicit.grad, explicit.grad)
        assert not np.array_equal(implicit.loss, other.loss), "γ changes nothing: the comparison proves nothing"
        assert not implicit.loss.flags.writeable and not implicit.grad.flags.writeable
        empty = client.compute(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32), reduction="mean")
        assert empty.loss.shape == () and np.isnan(empty.loss)


def _states_after_a_call(srv, seconds: float) -> list[grpc.ChannelConnectivity]:
    """The connectivity states a channel goes through in `seconds` after one call, with no further calls."""
    states: list[grpc.ChannelConnectivity] = []
    left_ready = threading.Event()

    def record(state):
        states.append(state)
        if states.count(grpc.ChannelConnectivity.READY) and state != grpc.ChannelConnectivity.READY:
            left_ready.set()

    with grpc.insecure_channel(srv.target) as channel:
        channel.subscribe(record)
        with FocalLossClient(srv.target) as client:  # a call through another channel: the server is up
            client.compute(np.array([0.5], np.float32), np.array([1.0], np.float32))
        grpc.channel_ready_future(channel).result(timeout=10)
        left_ready.wait(seconds)
        channel.unsubscribe(record)
    return states


def test_max_connection_age_closes_idle_connections(tmp_path):
    """`--max-connection-age-s`: the server closes a connection after that age (the client's channel leaves
    READY by itself); without the flag the same connection stays READY for longer."""
    row = next(r for r in _table("Running it") if "--max-connection-age-s" in r[0])
    assert "close connections after this age" in row[3], row
    aged = start_server(tmp_path, "--workers", "1", "--max-connection-age-s", "1")
    try:
        states = _states_after_a_call(aged, 30)
    finally:
        aged.stop()
    ready = states.index(grpc.ChannelConnectivity.READY)
    assert any(s != grpc.ChannelConnectivity.READY for s in states[ready:]), states
    plain = start_server(tmp_path, "--workers", "1")
    try:
        states = _states_after_a_call(plain, 5)
    finally:
        plain.stop()
    assert states[-1] == grpc.ChannelConnectivity.READY, states


def _size(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+) ?(KiB|K|MiB)", text).groups()
    return int(number) * {"K": 1024, "KiB": 1024, "MiB": 2**20}[unit]


def test_stated_thresholds_are_the_codes():
    """The CPU backend: the kernel's block, the in-place reading and the event-loop thresholds the README
    states are the constants the server uses."""
    from focalserve import service
    from focalserve.backends import numpy_backend

    text = _readme()
    block = re.search(r"one pass per block of (\d+K) elements", text)
    in_place = re.search(r"Requests from (\d+ KiB) are read in place", text)
    inline = re.search(r"requests up to (\d+ KiB) \(~[\d.]+K\s+elements\) are computed on the event loop", text)
    assert block and in_place and inline, "the README no longer states these thresholds"
    assert numpy_backend.BLOCK_ELEMENTS_COMPILED == _size(block.group(1))
    assert service.ZERO_COPY_BYTES == _size(in_place.group(1))
    assert service.INLINE_BYTES == _size(inline.group(1))


def test_cli_module_is_the_console_script(server):
    """`python -m focalserve_client ...` is the same program as `.venv/bin/focalserve-client ...`."""
    env = {**os.environ, "FOCALSERVE_TARGET": server.target}
    script = Path(sys.prefix) / "bin" / "focalserve-client"
    assert "python -m focalserve_client" in _readme()
    outputs = [subprocess.run(command + ["info"], capture_output=True, text=True, env=env, timeout=60)
               for command in ([str(script)], [sys.executable, "-m", "focalserve_client"])]
    assert [o.returncode for o in outputs] == [0, 0], [o.stderr for o in outputs]
    assert outputs[0].stdout == outputs[1].stdout and '"version"' in outputs[0].stdout
