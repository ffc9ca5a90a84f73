"""Training machinery: configuration, strategies, input pipelines, the run directory and
the training loop. The model API (`keras_alexnet.model`, `layers`, `preprocessing`,
`export`) never imports from here; the command-line recipes in the top-level
``training/`` folder do.
"""
