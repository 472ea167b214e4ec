"""The transport floor: a bare grpc.aio server that answers each request with a payload of a given size.

    python benchmarks/echo_server.py PORT [--reuse-port]

Methods (raw bytes, no protobuf): /bench.Echo/Unary and /bench.Echo/Stream. A request's first 8 bytes say
how many bytes to answer with (little-endian); the rest is payload. Same message limits, same allocator
settings (set by the caller) as focalserve, so the only difference is the work.
"""

from __future__ import annotations

import asyncio
import sys

import grpc

LIMIT = 256 * 1024 * 1024


def _answer(request: bytes) -> bytes:
    size = int.from_bytes(request[:8], "little")
    return bytes(size)


async def unary(request: bytes, context) -> bytes:
    return _answer(request)


async def stream(requests, context):
    async for request in requests:
        yield _answer(request)


async def main(port: int, reuse_port: bool) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", LIMIT),
                                      ("grpc.max_send_message_length", LIMIT), ("grpc.so_reuseport", int(reuse_port))])
    identity = dict(request_deserializer=None, response_serializer=None)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, **identity),
        "Stream": grpc.stream_stream_rpc_method_handler(stream, **identity),
    }),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), "--reuse-port" in sys.argv))
