"""Training: the `lorakit train` job (config, data, loop, checkpoints)."""
