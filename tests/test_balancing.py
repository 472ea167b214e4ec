"""Client-side balancing over replicas: three real servers on loopback, one client with round_robin."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from conftest import free_port, start_server
from focalserve_client import FocalLossClient
from test_operations import _sample, scrape

LOGIT = np.array([[0.97, 0.91, 0.03], [0.55, 0.43, 0.71]], np.float32)
LABEL = np.array([[1.0, 0, 0], [0, 1, 0]], np.float32)


def _computes(server) -> float:
    return _sample(scrape(server.metrics_port), "grpc_server_handled_total", grpc_method="Compute", grpc_code="OK")


@pytest.fixture
def replicas(tmp_path):
    servers = []
    for _ in range(3):
        metrics_port = free_port()
        srv = start_server(tmp_path, "--workers", "1", "--metrics-port", str(metrics_port), "--grace-seconds", "10",
                           "--drain-delay-s", "1")
        srv.metrics_port = metrics_port
        servers.append(srv)
    yield servers
    for srv in servers:
        srv.stop()


def test_round_robin_spreads_calls_and_survives_a_stopped_replica(replicas):
    target = "ipv4:" + ",".join(srv.target for srv in replicas)
    with FocalLossClient(target, options=[("grpc.lb_policy_name", "round_robin")], timeout=30) as client:
        for _ in range(30):
            assert f"{float(client.compute(LOGIT, LABEL, normalizer=2.0).loss):.8f}" == "0.65782464"
        counts = [_computes(srv) for srv in replicas]
        assert sum(counts) == 30 and all(c >= 5 for c in counts), counts  # every replica took its share

        # stop one replica while calls keep coming: none may fail
        errors: list[Exception] = []
        done = threading.Event()

        def keep_calling():
            while not done.is_set():
                try:
                    client.compute(LOGIT, LABEL, normalizer=2.0)
                except Exception as e:  # collected, asserted below
                    errors.append(e)

        callers = [threading.Thread(target=keep_calling) for _ in range(4)]
        for t in callers:
            t.start()
        stopped = replicas[0]
        assert stopped.stop() == 0
        before = [_computes(srv) for srv in replicas[1:]]
        threading.Event().wait(1.0)
        done.set()
        for t in callers:
            t.join(30)
        assert errors == []
        after = [_computes(srv) for srv in replicas[1:]]
        assert all(a > b for a, b in zip(after, before)), (before, after)  # the two left share the load
