"""Alert rules (deploy/prometheus): rendered from thresholds.yml into the rule file and the PrometheusRule,
checked and unit-tested with promtool, documented in the README, and seen firing in a real Prometheus that
scrapes a real server held at its call limit."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import yaml

from conftest import REPO, debian_tool, free_port, metrics_text, start_server
from focalloss.v1 import focal_loss_pb2_grpc as pb_grpc
from focalserve_client.client import build_request

PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "alerts.yml"
RULE_TESTS = PROMETHEUS_DIR / "alerts.test.yml"
K8S_RULE = REPO / "deploy" / "k8s" / "prometheusrule.yaml"

ALERTS = ["FocalserveDown", "FocalserveTargetsMissing", "FocalserveNotReady", "FocalserveHighErrorRatio",
          "FocalserveHighLatencyP99", "FocalserveSaturated", "FocalserveOverloadRefusals", "FocalserveGpuFallbacks",
          "FocalserveNonFiniteInputSurge", "FocalserveItemLossShift"]


def _renderer():
    spec = importlib.util.spec_from_file_location("render_alerts", PROMETHEUS_DIR / "render_alerts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _renderer()


@pytest.fixture(scope="module")
def promtool() -> str:
    binary = debian_tool("promtool", "prometheus")
    if binary is None:
        pytest.skip("promtool is not installed and could not be installed (apt-get install prometheus failed)")
    return binary


def _alert_rules(groups: list[dict]) -> dict[str, dict]:
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


# ---- one source: thresholds.yml ----

def test_rule_files_are_rendered_from_thresholds():
    assert render.main(["--check"]) == 0, "run `make alerts`"
    rules = yaml.safe_load(RULES.read_text())
    manifest = yaml.safe_load(K8S_RULE.read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert manifest["spec"]["groups"] == rules["groups"]
    assert sorted(_alert_rules(rules["groups"])) == sorted(ALERTS)


def test_every_threshold_is_used():
    """Each key of thresholds.yml changes the rendered rules: nothing there is dead, nothing is read elsewhere."""
    thresholds = render.load_thresholds()
    baseline = render.rule_file(thresholds)
    for key, value in thresholds.items():
        changed = {**thresholds, key: "7m" if isinstance(value, str) and value[-1] in "smh" else
                   'job="elsewhere"' if key == "selector" else "OK|UNKNOWN" if key == "error_codes_not_counted"
                   else 0.123}
        assert render.rule_file(changed) != baseline, key


def test_every_alert_is_documented():
    readme = (REPO / "README.md").read_text()
    for name, rule in _alert_rules(yaml.safe_load(RULES.read_text())["groups"]).items():
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["runbook"] == f"README.md#{name.lower()}", name
        # the labels that locate it: the job always, the instance wherever the rule keeps one
        assert "{{ $labels.job }}" in annotations["description"] or 'job="focalserve"' in annotations["description"]
        by = re.findall(r"by \(([^)]*)\)", rule["expr"])
        if by and all("instance" in b for b in by):
            assert "{{ $labels.instance }}" in annotations["description"], name
        assert re.search(rf"^#### {name}\n", readme, re.M), f"README has no runbook section for {name}"
        assert rule["labels"]["severity"] in ("critical", "warning")


# ---- promtool ----

def test_promtool_check_rules(promtool, tmp_path):
    r = subprocess.run([promtool, "check", "rules", RULES], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "SUCCESS: 12 rules found" in r.stdout, r.stdout + r.stderr
    # the PrometheusRule's groups, as a plain rule file
    spec = tmp_path / "k8s-rules.yml"
    spec.write_text(yaml.safe_dump({"groups": yaml.safe_load(K8S_RULE.read_text())["spec"]["groups"]}))
    r = subprocess.run([promtool, "check", "rules", spec], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_rule_unit_tests(promtool):
    r = subprocess.run([promtool, "test", "rules", RULE_TESTS.name], cwd=PROMETHEUS_DIR, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_unit_tests_cover_every_alert_firing_and_quiet():
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired, quiet = set(), set()
    for group in tests:
        for case in group.get("alert_rule_test", []):
            (fired if case["exp_alerts"] else quiet).add(case["alertname"])
    assert fired == set(ALERTS) and quiet == set(ALERTS)


# ---- a real Prometheus, a real server at its limit ----

def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.loads(reply.read())


def _fast_thresholds() -> dict:
    """The shipped thresholds with windows of seconds, so that rules can fire within the test."""
    fast = render.load_thresholds()
    for key, value in fast.items():
        if key.endswith("_for"):
            fast[key] = "1s"
        elif key.endswith(("_window", "_baseline")):
            fast[key] = "10s"
    return fast


@pytest.fixture
def prometheus_with_rules(tmp_path):
    binary = debian_tool("prometheus", "prometheus")
    if binary is None:
        pytest.skip("Prometheus is not installed and could not be installed (apt-get install prometheus failed)")

    def start(metrics_port: int) -> str:
        (tmp_path / "alerts.yml").write_text(render.rule_file(_fast_thresholds()))
        (tmp_path / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            "rule_files: [alerts.yml]\n"
            "scrape_configs:\n  - job_name: focalserve\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n")
        port = free_port()
        log = open(tmp_path / "prometheus.log", "w")
        process = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                    f"--storage.tsdb.path={tmp_path / 'data'}",
                                    f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
        started.append((process, log))
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{base}/-/ready", timeout=1).close()
                return base
            except OSError:
                time.sleep(0.2)
        pytest.fail(f"Prometheus did not become ready:\n{(tmp_path / 'prometheus.log').read_text()}")

    started: list = []
    yield start
    for process, log in started:
        process.terminate()
        process.wait(30)
        log.close()


def test_real_prometheus_fires_overload_alerts(tmp_path, prometheus_with_rules):
    metrics_port = free_port()
    srv = start_server(tmp_path, "--workers", "1", "--max-concurrent-rpcs", "1", "--metrics-port", str(metrics_port))
    base = prometheus_with_rules(metrics_port)
    release = threading.Event()
    request = build_request(np.zeros(16, np.float32), np.zeros(16, np.float32))
    wanted = {"FocalserveOverloadRefusals", "FocalserveSaturated", "FocalserveHighErrorRatio"}
    firing: dict[str, dict] = {}
    try:
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.FocalLossServiceStub(channel)

            def held_requests():
                release.wait(90)
                return
                yield  # pragma: no cover - a generator that sends nothing until released

            # An open ComputeStream that sends nothing holds the one slot: every other call is refused. No
            # Compute goes out before the server has started the stream: one arriving first would hold the
            # slot at that moment and get the stream itself refused.
            holder = stub.ComputeStream(held_requests(), timeout=120)
            started = re.compile(r'^grpc_server_started_total\{[^}]*grpc_method="ComputeStream"[^}]*\} 1\.0$', re.M)
            deadline = time.monotonic() + 30
            while not started.search(metrics_text(metrics_port)):
                assert time.monotonic() < deadline, "the held ComputeStream never started"
                time.sleep(0.05)
            for _ in range(100):  # its slot is taken right after it counts as started
                try:
                    stub.Compute(request, timeout=5)
                    time.sleep(0.05)
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                    break
            refused = 1
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not wanted <= set(firing):
                for _ in range(5):
                    with pytest.raises(grpc.RpcError) as e:
                        stub.Compute(request, timeout=5)
                    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    refused += 1
                alerts = _get(f"{base}/api/v1/alerts")["data"]["alerts"]
                firing = {a["labels"]["alertname"]: a for a in alerts if a["state"] == "firing"}
                time.sleep(0.5)
            release.set()
            summary = list(holder)
        assert wanted <= set(firing), f"after {refused} refusals, firing: {sorted(firing)}"
        print(f"\nafter {refused} refusals, Prometheus /api/v1/alerts: {json.dumps(firing['FocalserveOverloadRefusals'])}")
        overload = firing["FocalserveOverloadRefusals"]
        assert overload["labels"]["instance"] == f"127.0.0.1:{metrics_port}"
        assert overload["labels"]["job"] == "focalserve" and overload["labels"]["severity"] == "warning"
        assert f"focalserve instance 127.0.0.1:{metrics_port} refuses" in overload["annotations"]["description"]
        assert firing["FocalserveHighErrorRatio"]["labels"]["grpc_method"] == "Compute"
        assert "100%" in firing["FocalserveSaturated"]["annotations"]["description"]
        # the held stream itself ended normally once released
        assert summary[-1].summary.items == 0
        assert "FocalserveNotReady" not in firing and "FocalserveDown" not in firing
    finally:
        release.set()
        assert srv.stop() == 0


# ---- the Grafana dashboard ----

DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "focalserve.json"
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset",
             "bool", "inf", "nan"}


def _panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(f"{p['title']} [{t['refId']}]", t["expr"].replace("$__rate_interval", "1m").replace("$__interval", "1m"))
            for p in dashboard["panels"] for t in p["targets"]]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers outside label matchers, grouping clauses,
    strings and durations that are not functions or keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", text):  # not the `h` of `1h`
        following = text[match.end():].lstrip()[:1]
        if following != "(" and match.group().lower() not in _KEYWORDS:
            names.add(match.group())
    return names


def exposed_names(metrics_text: str) -> set[str]:
    """Every series name /metrics can show, from its TYPE lines (a labelled metric with no child yet has no
    sample, but has its TYPE)."""
    # a counter's TYPE line names it with or without `_total`, depending on the client library's version
    suffixes = {"counter": ("", "_total"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "gauge": ("",), "summary": ("_sum", "_count", "_created"), "info": ("_info",)}
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", metrics_text, re.M):
        names |= {name + s for s in suffixes.get(kind, ("",))}
    return names


def test_metric_names_are_found_in_queries():
    assert metric_names('sum(rate(grpc_server_handled_total{grpc_code!="OK"}[1m])) by (grpc_method) / up') == \
        {"grpc_server_handled_total", "up"}
    assert metric_names("histogram_quantile(0.5, sum by (le) (rate(focalloss_item_loss_bucket[5m] offset 1h)))") == \
        {"focalloss_item_loss_bucket"}


def test_dashboard_has_the_operator_panels():
    exprs = "\n".join(expr for _, expr in _panel_queries())
    titles = [p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]]
    assert len(titles) == len(set(titles))
    for needed in ("histogram_quantile(0.5, sum(rate(focalloss_item_loss_bucket", "focalloss_rejected_total",
                   "by (reason)", "focalloss_max_concurrent_rpcs", "grpc_server_started_total",
                   "focalloss_compute_seconds_sum", "by (backend)", "focalloss_build_info"):
        assert needed in exprs, needed


def test_dashboard_queries_parse_and_name_exposed_metrics(promtool, tmp_path):
    queries = _panel_queries()
    # every query as a recording rule: `promtool check rules` parses it offline
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(queries)]}]}
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(rules))
    r = subprocess.run([promtool, "check", "rules", tmp_path / "dashboard.yml"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and f"SUCCESS: {len(queries)} rules found" in r.stdout, r.stdout + r.stderr

    metrics_port = free_port()
    srv = start_server(tmp_path, "--metrics-port", str(metrics_port))
    try:
        exposed = exposed_names(metrics_text(metrics_port))
    finally:
        assert srv.stop() == 0
    for title, expr in queries:
        missing = metric_names(expr) - exposed
        assert not missing, f"panel {title!r} reads {missing}, which focalserve's /metrics does not have"
    # and the alert rules, for the same reason (recording rules' own names and `up` aside)
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    recorded = {r["record"] for r in rules if "record" in r}
    for rule in rules:
        missing = metric_names(rule["expr"]) - exposed - {"up"} - recorded
        assert not missing, f"{rule.get('alert') or rule['record']} reads {missing}"
