"""Server reflection as both `grpc.reflection.v1` (what grpcurl, grpcui and Postman ask first) and
`grpc.reflection.v1alpha` (older tools).

grpcio-reflection only ships v1alpha. The two protocols define the same messages field for field (v1 is
v1alpha renamed), so one servicer answers both; the v1 file descriptor is v1alpha's under the v1 package
and file name, added to the default pool so that tools can also describe the v1 service itself.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1ALPHA = reflection.SERVICE_NAME
V1 = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _rename(owner, field: str, old: str, new: str) -> None:
    # only where set: assigning even "" would mark a scalar field as having a message type
    value = getattr(owner, field)
    if value.startswith(old):
        setattr(owner, field, new + value[len(old):])


def add_v1_descriptor(pool: descriptor_pool.DescriptorPool | None = None) -> None:
    pool = pool or descriptor_pool.Default()
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = f".{proto.package}.", ".grpc.reflection.v1."
    proto.name, proto.package = _V1_FILE, "grpc.reflection.v1"
    proto.ClearField("options")  # v1alpha's language options (packages of generated code) do not apply

    def rename_fields(messages):
        for message in messages:
            for f in message.field:
                _rename(f, "type_name", old, new)
            rename_fields(message.nested_type)

    rename_fields(proto.message_type)
    for service in proto.service:
        for method in service.method:
            _rename(method, "input_type", old, new)
            _rename(method, "output_type", old, new)
    pool.AddSerializedFile(proto.SerializeToString())


def enable(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Reflection of `service_names` and of both reflection services, on an aio server."""
    add_v1_descriptor()
    servicer = reflection.aio.ReflectionServicer((*service_names, V1, V1ALPHA))
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers((
        grpc.method_handlers_generic_handler(V1, {"ServerReflectionInfo": handler}),
        grpc.method_handlers_generic_handler(V1ALPHA, {"ServerReflectionInfo": handler}),
    ))
