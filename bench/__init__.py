"""Benchmarks of keras_alexnet: the runner (``python -m bench``, `bench.run`) and the
single-purpose scripts it reuses (train_throughput, input_pipeline, serving_load).

Nothing in the library imports this package; it imports the library, and starts the
embedded server as a subprocess.
"""
