import os

# gRPC core writes its own lines to stderr, outside --log-format: keep them to errors (its default lets a line
# per failed TLS handshake through). Read when grpc is first imported, hence here; GRPC_VERBOSITY overrides.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

__version__ = '0.2.0'
