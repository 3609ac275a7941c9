"""The file-to-file verbs: merge an adapter into a model directory, combine adapter directories,
evaluate a run, load a base with adapters for generation. They sit above the library (config,
layers, inject, io, compose, model_io) and next to the CLI; nothing below them imports them."""
