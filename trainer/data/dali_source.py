"""The DALI backend of `TripletLoader`.

DALI reads only what an index lists, so each rank writes the surviving samples' indexes
(`SampleSet.write_indexes`) for its pipeline. They live only while the pipeline is built:
the reader parses them then (its metadata stays in memory for every later epoch), so they
take no space on the node afterwards, whatever the number of ranks, splits and samples
(about 120 bytes per sample per rank and split while they exist). They go to node-local
scratch: `$SLURM_TMPDIR` when set, else `$TMPDIR`, else /tmp (`tempfile`'s default).
"""

from __future__ import annotations

import os
import tempfile

import torch

from trainer.data.dali_loader import (
    build_iterator,
    build_pipeline,
    decode_keys,
    iterator_checkpoint,
)


def index_scratch() -> str | None:
    """Where the per-rank index files go: `$SLURM_TMPDIR` (the job's node-local scratch),
    else None: `tempfile`'s default ($TMPDIR, else /tmp)."""
    return os.environ.get("SLURM_TMPDIR") or None


class DaliSource:
    def __init__(self, loader, checkpoint: bytes | None = None):
        with tempfile.TemporaryDirectory(prefix="tricolor-idx-", dir=index_scratch()) as tmp:
            tars, indexes = loader.samples.write_indexes(tmp)
            self.pipe = self._build(loader, tars, indexes, checkpoint)
            self.flow = loader.flow
            self.iterator = build_iterator(self.pipe, self.flow)

    @staticmethod
    def _build(loader, tars, indexes, checkpoint):
        device = loader.device
        device_id = None
        if device.type == "cuda":
            device_id = device.index if device.index is not None else torch.cuda.current_device()
        cfg = loader.cfg
        return build_pipeline(
            tars,
            indexes,
            batch_size=cfg.batch_size,
            crop_size=cfg.crop_size,
            flip=cfg.flip,
            brightness_jitter=cfg.brightness_jitter,
            rank=loader.rank,
            world_size=loader.world_size,
            device_id=device_id,
            num_threads=cfg.num_threads,
            # A fresh pipeline for a restarted epoch gets a seed of its own, so that it does
            # not replay the shuffle of epoch 0.
            seed=loader.seed + 7919 * loader.epoch,
            shuffle=loader.shuffle,
            augment=loader.augment,
            checkpoint=checkpoint,
            flow=loader.flow,
            mmap=getattr(cfg, "mmap", True),
        )

    def next(self):
        """(frames [B, 3, H, W, 3] uint8, keys, and with flow (flow PNG pixels [B, 2, H, W, 3]
        uint8, mirrored [B] bool), else None)."""
        (out,) = next(self.iterator)
        extras = (out["flow"], out["mirror"].reshape(-1).bool()) if self.flow else None
        return out["frames"], decode_keys(out["info"]), extras

    def end_epoch(self) -> None:
        self.iterator.reset()

    def state(self) -> bytes:
        return iterator_checkpoint(self.iterator)
