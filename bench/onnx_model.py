"""The ONNX model ONNX Runtime is timed on: the library's own ONNX export.

`convert` is the one place the benchmark gets its ONNX file:
`keras_alexnet.portable.export_onnx`, the file `alexnet-export --format onnx` writes
(tf2onnx ``from_function`` of the model's plain functional graph, opset 17): input
``pixels`` ``float32 [batch, S, S, 3]`` (NHWC, like the export's ``serving_pixels``),
outputs the softmax probabilities and their top-k. Users of ONNX Runtime run exactly
this file, so it is the one to time.
"""

import pathlib

SOURCE = "keras_alexnet.portable.export_onnx (alexnet-export --format onnx, opset 17)"


def convert(model, path):
    """Writes ``model`` as the library's ONNX file at ``path``; returns the path."""
    from keras_alexnet import portable

    path = pathlib.Path(path)
    classes = [f"class_{i}" for i in range(int(model.output_shape[-1]))]
    # The benchmark compares ONNX Runtime with the SavedModel itself (bench.sides_tf).
    return portable.export_onnx(model, path, classes, overwrite=True, verify=False)
