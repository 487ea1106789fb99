"""The DALI backend of `TripletLoader`."""

from __future__ import annotations

import tempfile

import torch

from trainer.data.dali_loader import (
    build_iterator,
    build_pipeline,
    decode_keys,
    iterator_checkpoint,
)


class DaliSource:
    def __init__(self, loader, checkpoint: bytes | None = None):
        self._index_dir = tempfile.TemporaryDirectory(prefix="tricolor-idx-")
        tars, indexes = loader.samples.write_indexes(self._index_dir.name)
        device = loader.device
        device_id = None
        if device.type == "cuda":
            device_id = device.index if device.index is not None else torch.cuda.current_device()
        cfg = loader.cfg
        self.pipe = build_pipeline(
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
        )
        self.flow = loader.flow
        self.iterator = build_iterator(self.pipe, self.flow)

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
