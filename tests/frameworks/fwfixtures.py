"""Fixtures of the drop-in tests, which run inside .venv-frameworks (tests/test_frameworks.py runs them).

Not a conftest.py: the suite's tests/conftest.py is imported as `conftest`, which this imports from.
"""

from __future__ import annotations


import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port, metrics_text, start_server
from focalserve_client import FocalLossClient

SERVICE = "focalloss.v1.FocalLossService"


@pytest.fixture(scope="session")
def fw_server(tmp_path_factory):
    """A server with its /metrics on a port of its own, to count the calls the drop-ins make."""
    metrics_port = free_port()
    srv = start_server(tmp_path_factory.mktemp("fw"), "--workers", "2", "--metrics-port", str(metrics_port),
                       "--metrics-host", "127.0.0.1")
    srv.metrics_port = metrics_port
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="session")
def client(fw_server):
    with FocalLossClient(fw_server.target) as c:
        yield c


def handled_calls(server) -> dict[str, float]:
    """grpc_server_started_total of the focal loss service, by method (counted as a call starts, so before its
    response reaches the client)."""
    text = metrics_text(server.metrics_port)
    calls: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "grpc_server_started_total" and sample.labels.get("grpc_service") == SERVICE:
                method = sample.labels["grpc_method"]
                calls[method] = calls.get(method, 0.0) + sample.value
    return calls


def calls_since(server, before: dict[str, float]) -> dict[str, float]:
    after = handled_calls(server)
    return {m: after[m] - before.get(m, 0.0) for m in after if after[m] != before.get(m, 0.0)}
