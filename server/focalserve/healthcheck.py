"""`python -m focalserve.healthcheck`: exit 0 iff grpc.health.v1 says SERVING (the container HEALTHCHECK).

It reads the server's own environment, so the same command works for every configuration: plaintext by
default; TLS when FOCALSERVE_TLS_CERT is set, trusting FOCALSERVE_HEALTHCHECK_CA (default: the server's
certificate file, enough when it is self-signed or carries its chain); with mutual TLS
(FOCALSERVE_TLS_CLIENT_CA), presenting FOCALSERVE_HEALTHCHECK_CERT/_KEY (default: the server's own pair,
which works when that certificate also allows client authentication).
"""
import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


if __name__ == "__main__":
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m focalserve.healthcheck")
    p.add_argument("--target", default=f"localhost:{env('FOCALSERVE_PORT', '50051')}")
    p.add_argument("--tls-ca", default=env("FOCALSERVE_HEALTHCHECK_CA") or env("FOCALSERVE_TLS_CERT"))
    p.add_argument("--tls-cert", default=env("FOCALSERVE_HEALTHCHECK_CERT")
                   or (env("FOCALSERVE_TLS_CERT") if env("FOCALSERVE_TLS_CLIENT_CA") else None))
    p.add_argument("--tls-key", default=env("FOCALSERVE_HEALTHCHECK_KEY")
                   or (env("FOCALSERVE_TLS_KEY") if env("FOCALSERVE_TLS_CLIENT_CA") else None))
    p.add_argument("--server-name", default=env("FOCALSERVE_HEALTHCHECK_SERVER_NAME"),
                   help="name to verify the server certificate against, when it is not the target's host")
    a = p.parse_args()
    options = [("grpc.enable_http_proxy", 0)]
    if a.server_name:
        options.append(("grpc.ssl_target_name_override", a.server_name))
    if a.tls_ca or a.tls_cert:
        credentials = grpc.ssl_channel_credentials(_read(a.tls_ca), _read(a.tls_key), _read(a.tls_cert))
        channel = grpc.secure_channel(a.target, credentials, options)
    else:
        channel = grpc.insecure_channel(a.target, options)
    with channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3).status
        except grpc.RpcError as e:
            sys.exit(f"{a.target}: {e.code().name}")  # exit status 1
    print(f"{a.target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")
    sys.exit(0 if status == health_pb2.HealthCheckResponse.SERVING else 1)
