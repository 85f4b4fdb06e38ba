"""The training engine: config schema, process groups, optimizer, checkpoints, metrics, trainer."""
