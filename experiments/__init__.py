"""Experiments that train and score models to write a report (not tests, not benchmarks of
speed): `make quality` (experiments/quality)."""
