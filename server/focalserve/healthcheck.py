"""`python -m focalserve.healthcheck [--target HOST:PORT]`: exit 0 iff grpc.health.v1 says SERVING (HEALTHCHECK)."""
import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m focalserve.healthcheck")
    p.add_argument("--target", default=f"localhost:{os.environ.get('FOCALSERVE_PORT', '50051')}")
    target = p.parse_args().target
    with grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)]) as channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3).status
        except grpc.RpcError as e:
            sys.exit(f"{target}: {e.code().name}")  # exit status 1
    print(f"{target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")
    sys.exit(0 if status == health_pb2.HealthCheckResponse.SERVING else 1)
