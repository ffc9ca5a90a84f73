"""The ONNX model ONNX Runtime is timed on: the Keras model's softmax, converted here.

`convert` is the one place the benchmark gets its ONNX file. It converts inside the
benchmark with ``tf2onnx.convert.from_function`` (``from_keras`` fails on Keras 3):
input ``pixels`` ``float32 [batch, S, S, 3]`` (NHWC, like the export's
``serving_pixels``), output the softmax probabilities, opset 17. The network is traced
as its plain functional graph (the same layers and weights), without `AlexNet.call`'s
empty-batch ``tf.cond``: tf2onnx turns that into an ONNX ``If`` whose branch ONNX
Runtime refuses to load (a type-inference failure). To time the library's own ONNX
file instead, `convert` becomes one call of ``keras_alexnet.portable.export_onnx`` and
`SOURCE` says so.
"""

import pathlib

SOURCE = "tf2onnx.convert.from_function of the functional graph, in the benchmark (opset 17)"
OPSET = 17


def convert(model, path):
    """Writes ``model``'s softmax as ONNX to ``path``; returns the path."""
    import keras
    import tensorflow as tf
    import tf2onnx

    size = int(model.input_shape[1])
    graph = keras.Model(model.input, model.output)  # no empty-batch tf.cond (see above)
    function = tf.function(lambda x: tf.nn.softmax(graph(x, training=False)))
    signature = (tf.TensorSpec((None, size, size, 3), tf.float32, name="pixels"),)
    path = pathlib.Path(path)
    tf2onnx.convert.from_function(function, input_signature=signature, opset=OPSET,
                                  output_path=str(path))
    return path
