"""The error every serving layer raises: a gRPC status code and TF Serving's message."""

import grpc

MAX_MESSAGE_CHARS = 1024


class ServingError(Exception):
    """A request failure with the gRPC `code` and `message` TF Serving would send.

    `message` is cut to 1024 characters plus `...TRUNCATED`, as `ToGRPCStatus` does.
    """

    def __init__(self, code, message):
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + "...TRUNCATED"
        super().__init__(message)
        self.code = code
        self.message = message


# tensorflow.error.Code and grpc.StatusCode share numbers.
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def code_from_number(number):
    """Returns the `grpc.StatusCode` with TensorFlow error code `number` (UNKNOWN if none)."""
    return _BY_NUMBER.get(int(number), grpc.StatusCode.UNKNOWN)
