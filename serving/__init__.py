"""Serving for keras_alexnet SavedModels: a TF Serving compatible server and a top-5 client.

`serving.server` speaks TensorFlow Serving's gRPC and REST APIs over exported versions;
`serving.client` classifies images against it or against the real `tensorflow/serving`.
Importing this package imports neither.
"""
