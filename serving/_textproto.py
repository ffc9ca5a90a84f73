"""Text-format configs that TF Serving reads but `tensorflow-serving-api` does not ship.

`BatchingParameters` (session_bundle_config.proto), `SSLConfig` (ssl_config.proto) and
`MonitoringConfig` with its `PrometheusConfig` (monitoring_config.proto) are described here
field for field so that `google.protobuf.text_format` parses the same files the
real server does, with the same errors for unknown fields. `ModelServerConfig` comes from the
wheel.
"""

from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    message_factory,
    text_format,
    wrappers_pb2,
)
from tensorflow_serving.config import model_server_config_pb2

_F = descriptor_pb2.FieldDescriptorProto
_FIELDS = {
    "BatchingParameters": [
        ("max_batch_size", 1, ".google.protobuf.Int64Value", False),
        ("batch_timeout_micros", 2, ".google.protobuf.Int64Value", False),
        ("thread_pool_name", 3, ".google.protobuf.StringValue", False),
        ("num_batch_threads", 4, ".google.protobuf.Int64Value", False),
        ("max_enqueued_batches", 5, ".google.protobuf.Int64Value", False),
        ("allowed_batch_sizes", 6, _F.TYPE_INT64, True),
        ("pad_variable_length_inputs", 7, _F.TYPE_BOOL, False),
        ("enable_large_batch_splitting", 8, ".google.protobuf.BoolValue", False),
        ("max_execution_batch_size", 9, ".google.protobuf.Int64Value", False),
        ("batch_padding_policy", 10, ".google.protobuf.StringValue", False),
    ],
    "SSLConfig": [
        ("server_key", 1, _F.TYPE_STRING, False),
        ("server_cert", 2, _F.TYPE_STRING, False),
        ("custom_ca", 3, _F.TYPE_STRING, False),
        ("client_verify", 4, _F.TYPE_BOOL, False),
    ],
    "PrometheusConfig": [
        ("enable", 1, _F.TYPE_BOOL, False),
        ("path", 2, _F.TYPE_STRING, False),
    ],
    "MonitoringConfig": [
        ("prometheus_config", 1, ".tensorflow.serving.PrometheusConfig", False),
    ],
}


def _build_classes():
    pool = descriptor_pool.DescriptorPool()
    wrappers = descriptor_pb2.FileDescriptorProto()
    wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
    pool.Add(wrappers)
    file = descriptor_pb2.FileDescriptorProto(
        name="serving_stand_in_configs.proto",
        package="tensorflow.serving",
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    for message, fields in _FIELDS.items():
        msg = file.message_type.add(name=message)
        for name, number, kind, repeated in fields:
            field = msg.field.add(name=name, number=number)
            field.label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
            if isinstance(kind, str):
                field.type, field.type_name = _F.TYPE_MESSAGE, kind
            else:
                field.type = kind
    pool.Add(file)
    return {
        m: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"tensorflow.serving.{m}"))
        for m in _FIELDS
    }


_CLASSES = _build_classes()
BatchingParameters = _CLASSES["BatchingParameters"]
SSLConfig = _CLASSES["SSLConfig"]
MonitoringConfig = _CLASSES["MonitoringConfig"]


class ConfigParseError(ValueError):
    """A config file that is not valid text format for its message type."""


def parse_file(path, message_class):
    """Parses the text-format file at `path` into a new `message_class` message.

    Raises:
        ConfigParseError: "Error parsing text-format <full message name>: <details>".
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    message = message_class()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as e:
        raise ConfigParseError(
            f"Error parsing text-format {message.DESCRIPTOR.full_name}: {e}"
        ) from None
    return message


def parse_model_server_config(path):
    """Parses a `--model_config_file` into a `tensorflow.serving.ModelServerConfig`."""
    return parse_file(path, model_server_config_pb2.ModelServerConfig)
