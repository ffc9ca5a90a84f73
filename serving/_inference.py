"""The request handlers behind both front ends, on `tensorflow-serving-api` protos.

Each function takes a request proto and returns the response proto TF Serving would send, or
raises `ServingError` with its code and message. Checks run in TF Serving's order
(predict_util.cc, classifier.cc, regressor.cc, multi_inference.cc, get_model_metadata_impl.cc,
get_model_status_impl.cc); the first failing one wins.

Request bounds (`Runner(max_request_elements=..., max_request_strings=...)`): before any
input is decoded, the declared shapes of all of a Predict's inputs are validated and their
element counts summed; over `serving._tensors.DEFAULT_MAX_ELEMENTS` (256 x 227 x 227 x 3 =
39,574,272) elements (4-byte units: 8-byte dtypes count twice, complex128 four times), or over
`DEFAULT_MAX_STRINGS` (2**20) DT_STRING elements, the request fails with INVALID_ARGUMENT
`tensor parsing error: <alias>: <n> elements (4-byte units) declared, more than the limit of
<cap> elements per request (max_request_elements)` and nothing is allocated. None disables a
cap.
"""

import functools
import time

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    predict_pb2,
    regression_pb2,
)

from serving._errors import ServingError, code_from_number
from serving._metrics import DISABLED
from serving._tensors import (
    DEFAULT_MAX_ELEMENTS,
    DEFAULT_MAX_STRINGS,
    TensorLimitError,
    TensorParseError,
    check_limits,
    declared_elements,
    dtype_name,
    element_units,
    from_ndarray,
    to_ndarray,
)

DEFAULT_SIGNATURE = "serving_default"
PREDICT_METHODS = ("tensorflow/serving/predict", "tensorflow/serving/classify",
                   "tensorflow/serving/regress")
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
_INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _braces(keys):
    return "{" + ",".join(sorted(keys)) + "}"


def _require_spec(request):
    if not request.HasField("model_spec"):
        raise ServingError(_INVALID, "Missing ModelSpec")
    return request.model_spec


def _echo_spec(response_spec, request_spec, servable, signature_name=None):
    response_spec.name = request_spec.name
    response_spec.version.value = servable.version
    if signature_name is not None:
        response_spec.signature_name = signature_name


def run_signature(servable, signature_name, feeds):
    """Runs a signature on NumPy `feeds` by alias; returns all outputs as NumPy arrays.

    TensorFlow errors keep their code and message, as TF Serving passes them through.
    """
    function = servable.signatures.get(signature_name)
    if function is None:
        raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                           f'Serving signature key "{signature_name}" not found.')
    try:
        outputs = function(**{alias: tf.constant(value) for alias, value in feeds.items()})
    except tf.errors.OpError as e:
        raise ServingError(code_from_number(e.error_code), e.message) from None
    except (TypeError, ValueError) as e:
        raise ServingError(_INVALID, str(e)) from None
    return {alias: np.asarray(tensor.numpy()) for alias, tensor in outputs.items()}


class Runner:
    """Runs signatures, directly or through a server-side batcher, honouring deadlines.

    Args:
        batcher: an optional `serving._batching.Batcher`.
        enable_signature_method_name_check: reject Predict on non-predict signatures.
        max_request_elements: cap on the elements all of a Predict's inputs declare (None = no
            cap); see the module docstring.
        max_request_strings: cap on the DT_STRING elements they declare (None = no cap).
        metrics: a `serving._metrics.Metrics`, told the runtime of each Predict, Classify and
            Regress run and the examples of each MultiInference.
    """

    def __init__(self, batcher=None, enable_signature_method_name_check=False,
                 max_request_elements=DEFAULT_MAX_ELEMENTS,
                 max_request_strings=DEFAULT_MAX_STRINGS, metrics=DISABLED):
        self.batcher = batcher
        self.method_check = enable_signature_method_name_check
        self.max_request_elements = max_request_elements
        self.max_request_strings = max_request_strings
        self.metrics = metrics

    def run(self, servable, signature_name, feeds, deadline=None):
        if self.batcher is not None:
            return self.batcher.run(servable, signature_name, feeds, deadline)
        return run_signature(servable, signature_name, feeds)

    def _timed_run(self, api, spec, servable, signature_name, feeds, deadline):
        """`run`, recording its time as TF Serving's runtime latency once it succeeded."""
        start = time.monotonic()
        outputs = self.run(servable, signature_name, feeds, deadline)
        self.metrics.runtime(spec.name, api, time.monotonic() - start)
        return outputs

    # Predict.

    def predict(self, manager, request, deadline=None):
        """Handles a `PredictRequest`."""
        spec = _require_spec(request)
        servable = manager.resolve(spec)
        signature_name = spec.signature_name or DEFAULT_SIGNATURE
        signature = servable.signature_defs.get(signature_name)
        if signature is None:
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                               f'Serving signature key "{signature_name}" not found.')
        if self.method_check and signature.method_name not in PREDICT_METHODS:
            raise ServingError(
                grpc.StatusCode.INTERNAL,
                "Expected prediction signature method_name to be one of "
                f"{{{', '.join(PREDICT_METHODS)}}}. Was: {signature.method_name}")
        decoded = decode_inputs(signature, request.inputs, self.max_request_elements,
                                self.max_request_strings)
        output_keys = check_output_filter(signature, request.output_filter)
        feeds = check_input_dtypes(signature, decoded)
        outputs = self._timed_run("Predict", spec, servable, signature_name, feeds, deadline)
        response = predict_pb2.PredictResponse()
        for alias in output_keys:
            response.outputs[alias].CopyFrom(
                from_ndarray(outputs[alias], dtype=signature.outputs[alias].dtype))
        _echo_spec(response.model_spec, spec, servable, signature_name)
        return response

    # Classify, Regress, MultiInference.

    def _example_signature(self, manager, request, servable, method, kind):
        """Resolves a Classify/Regress request's servable and its one-input signature.

        Returns ``(spec, servable, signature_name, signature)``; checks the method name
        (when enabled) and the single input, in TF Serving's order and words.
        """
        spec = _require_spec(request)
        servable = servable or manager.resolve(spec)
        signature_name = spec.signature_name or DEFAULT_SIGNATURE
        signature = _find_signature(servable, signature_name)
        if self.method_check and signature.method_name != method:
            raise ServingError(
                _INVALID, f"Expected {kind} signature method_name to be "
                f"{method}. Was: {signature.method_name}")
        if len(signature.inputs) != 1:
            raise ServingError(_INVALID, "Expected one input Tensor.")
        return spec, servable, signature_name, signature

    def classify(self, manager, request, deadline=None, _servable=None):
        """Handles a `ClassificationRequest`."""
        spec, servable, signature_name, signature = self._example_signature(
            manager, request, _servable, CLASSIFY_METHOD, "classification")
        if len(signature.outputs) not in (1, 2):
            raise ServingError(
                _INVALID, f"Expected one or two output Tensors, found {len(signature.outputs)}")
        if "inputs" not in signature.inputs:
            raise ServingError(_INVALID,
                               f"No classification inputs found in SignatureDef: {signature}")
        has_classes, has_scores = "classes" in signature.outputs, "scores" in signature.outputs
        if not (has_classes or has_scores):
            raise ServingError(
                _INVALID, 'Expected classification signature outputs to contain at least one '
                f'of "classes" or "scores". Signature was: {signature}')
        examples = serialize_examples(request.input)
        # A MultiInference task (`_servable` given) records examples, not runtime, as upstream.
        run = self.run if _servable is not None else functools.partial(
            self._timed_run, "Classify", spec)
        outputs = run(servable, signature_name, {"inputs": examples}, deadline)
        batch = len(examples)
        classes = outputs.get("classes") if has_classes else None
        scores = outputs.get("scores") if has_scores else None
        for name, value in (("classes", classes), ("scores", scores)):
            if value is None:
                continue
            if value.ndim != 2:
                raise ServingError(_INVALID, "Expected Tensor shape: [batch_size num_classes] "
                                             f"but got {list(value.shape)}")
            if value.shape[0] != batch:
                raise ServingError(
                    _INVALID, f"Expected {name} output batch size of {batch}. "
                    f"Got: {value.shape[0]}")
        declared = {k: types_pb2.DataType.Name(v.dtype) for k, v in signature.outputs.items()}
        if scores is not None and scores.dtype != np.float32:
            raise ServingError(_INVALID, "Expected scores Tensor of DT_FLOAT. Got: "
                                         f"{declared['scores']}")
        if classes is not None and classes.dtype != object:
            raise ServingError(_INVALID, "Expected classes Tensor of DT_STRING. Got: "
                                         f"{declared['classes']}")
        if classes is not None and scores is not None and classes.shape != scores.shape:
            raise ServingError(_INVALID, "Tensors class and score should match in dim[1]. "
                                         f"Got {classes.shape[1]} vs. {scores.shape[1]}")
        k = (classes if classes is not None else scores).shape[1]
        response = classification_pb2.ClassificationResponse()
        for i in range(batch):
            row = response.result.classifications.add()
            for j in range(k):
                cls = row.classes.add()
                if classes is not None:
                    cls.label = _text(classes[i, j])
                if scores is not None:
                    cls.score = float(scores[i, j])
        _echo_spec(response.model_spec, spec, servable, signature_name)
        return response

    def regress(self, manager, request, deadline=None, _servable=None):
        """Handles a `RegressionRequest`."""
        spec, servable, signature_name, signature = self._example_signature(
            manager, request, _servable, REGRESS_METHOD, "regression")
        if len(signature.outputs) != 1:
            raise ServingError(_INVALID, "Expected one output Tensor.")
        if "inputs" not in signature.inputs:
            raise ServingError(_INVALID, f"No regression inputs found in SignatureDef: {signature}")
        if "outputs" not in signature.outputs:
            raise ServingError(_INVALID,
                               f"No regression outputs found in SignatureDef: {signature}")
        examples = serialize_examples(request.input)
        run = self.run if _servable is not None else functools.partial(
            self._timed_run, "Regress", spec)
        values = run(servable, signature_name, {"inputs": examples}, deadline)["outputs"]
        if values.ndim == 2 and values.shape[1] == 1:
            values = values[:, 0]
        if values.ndim != 1 or values.shape[0] != len(examples):
            raise ServingError(_INVALID, "Expected output Tensor shape to be either [batch_size] "
                                         f"or [batch_size, 1] but got {list(values.shape)}")
        response = regression_pb2.RegressionResponse()
        for value in values:
            response.result.regressions.add().value = float(value)
        _echo_spec(response.model_spec, spec, servable, signature_name)
        return response

    def multi_inference(self, manager, request, deadline=None):
        """Handles a `MultiInferenceRequest` of classify and regress tasks on one model."""
        if not request.tasks:
            raise ServingError(_INVALID, "Found no tasks in MultiInferenceRequest.")
        for task in request.tasks:
            _require_spec(task)
        names = {task.model_spec.name for task in request.tasks}
        if len(names) != 1:
            raise ServingError(_INVALID, "All ModelSpecs in a MultiInferenceRequest must "
                                         "access the same model name.")
        seen = set()
        for task in request.tasks:
            signature_name = task.model_spec.signature_name or DEFAULT_SIGNATURE
            if signature_name in seen:
                raise ServingError(_INVALID,
                                   f"Duplicate evaluation of signature: {signature_name}")
            seen.add(signature_name)
            if task.method_name not in (CLASSIFY_METHOD, REGRESS_METHOD):
                raise ServingError(grpc.StatusCode.UNIMPLEMENTED,
                                   f"Unsupported signature method_name: {task.method_name}")
        servable = manager.resolve(request.tasks[0].model_spec)
        response = inference_pb2.MultiInferenceResponse()
        for task in request.tasks:
            signature_name = task.model_spec.signature_name or DEFAULT_SIGNATURE
            if signature_name not in servable.signature_defs:
                raise ServingError(_INVALID, "Requested signature not found in model graph: "
                                             f"{signature_name}")
            result = response.results.add()
            if task.method_name == CLASSIFY_METHOD:
                sub = classification_pb2.ClassificationRequest(
                    model_spec=task.model_spec, input=request.input)
                answer = self.classify(manager, sub, deadline, _servable=servable)
                result.classification_result.CopyFrom(answer.result)
            else:
                sub = regression_pb2.RegressionRequest(model_spec=task.model_spec,
                                                       input=request.input)
                answer = self.regress(manager, sub, deadline, _servable=servable)
                result.regression_result.CopyFrom(answer.result)
            result.model_spec.CopyFrom(answer.model_spec)
        kind = request.input.WhichOneof("kind")
        self.metrics.examples(names.pop(), len(getattr(request.input, kind).examples))
        return response


class Pinned:
    """A manager stand-in resolving every `ModelSpec` to one servable (REST, warm-up)."""

    def __init__(self, servable):
        self.servable = servable

    def resolve(self, model_spec):
        return self.servable


def _find_signature(servable, signature_name):
    signature = servable.signature_defs.get(signature_name)
    if signature is None:
        raise ServingError(_INVALID, f"No signature was found with the name: {signature_name}")
    return signature


def _text(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def decode_inputs(signature, inputs, max_elements=DEFAULT_MAX_ELEMENTS,
                  max_strings=DEFAULT_MAX_STRINGS):
    """Matches request inputs to signature aliases and decodes them (steps 5-7).

    All declared shapes are validated, and their element counts summed against `max_elements`
    (DT_STRING ones also against `max_strings`), before any input is decoded.

    Returns:
        {alias: (array, DataType sent)}.
    """
    requested, expected = set(inputs), set(signature.inputs)
    if len(requested) != len(expected) or not requested:
        raise ServingError(
            _INVALID,
            f"input size does not match signature: {len(requested)}!={len(expected)} "
            f"len({_braces(requested)}) != len({_braces(expected)}). "
            f"Sent extra: {_braces(requested - expected)}. "
            f"Missing but required: {_braces(expected - requested)}.")
    for alias in sorted(expected):
        if alias not in requested:
            raise ServingError(
                _INVALID,
                f"Signature input alias: {alias}(feed name: {signature.inputs[alias].name}) not "
                f"found in request and no default value provided. Inputs expected to be in the "
                f"request {_braces(expected)}, or default input alias set: ")
    total = strings = 0
    for alias in sorted(requested):
        proto = inputs[alias]
        try:
            n = declared_elements(proto)
            total += element_units(proto, n)
            if proto.dtype == types_pb2.DT_STRING:
                strings += n
            check_limits(total, strings, max_elements, max_strings)
        except TensorLimitError as e:
            raise ServingError(_INVALID, f"tensor parsing error: {alias}: {e}") from None
        except TensorParseError:
            raise ServingError(_INVALID, f"tensor parsing error: {alias}") from None
    decoded = {}
    for alias in sorted(requested):
        try:
            decoded[alias] = (to_ndarray(inputs[alias], None, None), inputs[alias].dtype)
        except TensorParseError:
            raise ServingError(_INVALID, f"tensor parsing error: {alias}") from None
    return decoded


def check_output_filter(signature, output_filter):
    """Returns the output aliases to send (step 8)."""
    seen = []
    for alias in output_filter:
        if alias not in signature.outputs:
            raise ServingError(
                _INVALID, f"output tensor alias not found in signature: {alias} Outputs "
                f"expected to be in the set {_braces(signature.outputs)}.")
        if alias in seen:
            raise ServingError(_INVALID, f"duplicate output tensor alias: {alias}")
        seen.append(alias)
    return seen or sorted(signature.outputs)


def check_input_dtypes(signature, decoded):
    """The session's dtype check (row 11); returns {alias: array} to feed."""
    feeds = {}
    for index, alias in enumerate(sorted(decoded)):
        array, dtype = decoded[alias]
        expected = signature.inputs[alias].dtype
        if dtype != expected:
            raise ServingError(
                _INVALID, f"Expects arg[{index}] to be {dtype_name(expected)} but "
                f"{dtype_name(dtype)} is provided")
        feeds[alias] = array
    return feeds


def serialize_examples(request_input):
    """Returns the serialized `tf.Example`s of an `Input` as a 1-D object array."""
    kind = request_input.WhichOneof("kind")
    if kind == "example_list":
        examples = [e.SerializeToString() for e in request_input.example_list.examples]
    elif kind == "example_list_with_context":
        context = request_input.example_list_with_context.context.SerializeToString()
        examples = [context + e.SerializeToString()
                    for e in request_input.example_list_with_context.examples]
    else:
        examples = []
    if not examples:
        raise ServingError(_INVALID, "Input is empty.")
    array = np.empty(len(examples), dtype=object)
    array[:] = examples
    return array


def get_model_metadata(manager, request):
    """Handles a `GetModelMetadataRequest`."""
    spec = _require_spec(request)
    if not request.metadata_field:
        raise ServingError(_INVALID,
                           "GetModelMetadataRequest must specify at least one metadata_field")
    for field in request.metadata_field:
        if field != "signature_def":
            raise ServingError(_INVALID, f"Metadata field {field} is not supported")
    servable = manager.resolve(spec)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    _echo_spec(response.model_spec, spec, servable)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for key, signature in servable.signature_defs.items():
        signature_map.signature_def[key].CopyFrom(signature)
    response.metadata["signature_def"].Pack(signature_map)
    return response


def get_model_status(manager, request):
    """Handles a `GetModelStatusRequest`: versions highest first, retired ones as END."""
    spec = _require_spec(request)
    name = spec.name
    if spec.HasField("version"):
        rows = manager.version_states(name, spec.version.value)
        if not rows:
            raise ServingError(grpc.StatusCode.NOT_FOUND,
                               f"Could not find version {spec.version.value} of model {name}")
    else:
        rows = manager.version_states(name)
        if not rows:
            raise ServingError(grpc.StatusCode.NOT_FOUND,
                               f"Could not find any versions of model {name}")
    response = get_model_status_pb2.GetModelStatusResponse()
    for version, state, error_code, error_message in rows:
        entry = response.model_version_status.add(version=version, state=state)
        entry.status.error_code = error_code
        entry.status.error_message = error_message
    return response
