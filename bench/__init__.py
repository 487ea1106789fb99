"""Throughput benchmarks (docs/benchmarks.md, `make bench`): the data loader, the training step
against the 3-frame GAN's, data-parallel scaling, loader start-up."""
