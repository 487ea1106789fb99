"""The training system: configuration, data, the G/D step, metrics, checkpoints, logging."""
