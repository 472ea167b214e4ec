"""The in-place reader of requests lives with its writer in the client distribution (one codec, tested
against protobuf in both directions): focalserve_client/wire.py. Re-exported here for the server's imports."""

from focalserve_client.wire import (MOST_FIELDS, MOST_TENSOR_FIELDS, TENSOR_DATA, TENSOR_FIELDS,  # noqa: F401
                                    split)
