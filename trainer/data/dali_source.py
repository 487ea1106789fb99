"""The DALI backend of `TripletLoader`.

DALI reads only what an index lists, so each rank writes the surviving samples' indexes
(`SampleSet.write_indexes`) for its pipeline. They live only while the pipeline is built:
the reader parses them then (its metadata stays in memory for every later epoch), so they
take no space on the node afterwards, whatever the number of ranks, splits and samples
(about 120 bytes per sample per rank and split while they exist). They go to node-local
scratch: `$SLURM_TMPDIR` when set, else `$TMPDIR`, else /tmp (`tempfile`'s default).

A sample DALI fails on (damaged since the shards were indexed) stops its pipeline: DALI's
error names the member where it could not decode one, not where a crop window did not fit.
The named shard (or, when none is named, every shard of the list) is scanned again on the
host with every checksum (`samples.rescan`); the damaged samples are named and counted
(`TripletLoader.skip_bad`), each replaced in the index by another sample of its shard (every
rank's slice keeps its length), and a new pipeline, shuffled anew, gives the rest of the
epoch. A failure the scan cannot pin on a sample stops the loader with one line
(`BadSamplesError`).
"""

from __future__ import annotations

import os
import re
import tempfile
import weakref
from pathlib import Path

import torch

from shards.tario import split_member_name
from trainer.data.dali_loader import (
    build_iterator,
    build_pipeline,
    decode_keys,
    iterator_checkpoint,
)
from trainer.data.samples import line_key, rescan

# "Failed to decode sample #2 : <tar>:<offset>:<key>.<ext>": DALI's error for a member its
# decoder rejects
FAILED_SOURCE = re.compile(r"Failed to decode sample #\d+ : (.+):(\d+):([^\s:]+)$", re.M)


def index_scratch() -> str | None:
    """Where the per-rank index files go: `$SLURM_TMPDIR` (the job's node-local scratch),
    else None: `tempfile`'s default ($TMPDIR, else /tmp)."""
    return os.environ.get("SLURM_TMPDIR") or None


def dali_cause(error: Exception) -> str:
    """The line of a DALI error that says what went wrong (after "encountered:")."""
    lines = [line.strip() for line in str(error).splitlines()]
    if "encountered:" in lines:
        lines = lines[lines.index("encountered:") + 1 :]
    return next((line for line in lines if line and "pipeline object" not in line),
                type(error).__name__)


class DaliSource:
    def __init__(self, loader, checkpoint: bytes | None = None):
        # Not a reference: the loader holds this source, and a cycle would keep the pipeline
        # and DALI's threads alive past the loader until the garbage collector runs; a
        # process forked meanwhile (DataLoader workers) can inherit a lock one of them held.
        self.loader, self.flow = weakref.proxy(loader), loader.flow
        self.samples = loader.samples  # what the pipeline reads: damaged samples replaced
        self.rebuilds = 0  # pipelines built after one failed on a sample
        # batches given out of the pipeline's current epoch: a restored one is where it was
        self.taken = loader._step if checkpoint else 0
        self.iterator = None
        self._start(checkpoint)

    def _start(self, checkpoint: bytes | None = None) -> None:
        """Build the pipeline and its iterator, which reads the first batch already."""
        while True:
            with tempfile.TemporaryDirectory(prefix="tricolor-idx-", dir=index_scratch()) as tmp:
                tars, indexes = self.samples.write_indexes(tmp)
                self.pipe = self._build(self.loader, tars, indexes, checkpoint, self.rebuilds)
                try:
                    self.iterator = build_iterator(self.pipe, self.flow)
                    return
                except RuntimeError as e:  # a sample of the first batches
                    error = e
            self._recover(error)
            checkpoint = None

    @staticmethod
    def _build(loader, tars, indexes, checkpoint, rebuilds=0):
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
            # not replay the shuffle of epoch 0; so does one that replaces a failed pipeline.
            seed=loader.seed + 7919 * loader.epoch + 104729 * rebuilds,
            shuffle=loader.shuffle,
            augment=loader.augment,
            checkpoint=checkpoint,
            flow=loader.flow,
            mmap=getattr(cfg, "mmap", True),
        )

    def _recover(self, error: RuntimeError) -> None:
        """After DALI failed on a sample: name, count and replace the damaged samples."""
        self.iterator = self.pipe = None  # a pipeline that failed is not used again
        self.rebuilds += 1
        self.taken = 0
        loader = self.loader
        named = FAILED_SOURCE.search(str(error))
        tar = Path(named[1]) if named else None
        found = rescan(Path(loader.cfg.shards), loader.split, self.samples,
                       None if tar is None else {tar})
        if named:
            key = split_member_name(named[3])[0]
            reading = any(s.tar == tar and key in map(line_key, s.lines)
                          for s in self.samples.shards)
            if reading and (tar, key) not in found:  # sound on disk, yet it did not decode
                found[(tar, key)] = f"undecodable ({named[3]}: DALI: {dali_cause(error)})"
        if not found:
            loader.fail(f"{loader.cfg.shards}: DALI failed while reading the {loader.split} "
                        f"split ({dali_cause(error)}), and scanning "
                        f"{tar or 'its shards'} again finds no damaged sample: run "
                        f"`tricolor-shards verify {loader.cfg.shards}` (it decodes every "
                        "member), or use data.backend=webdataset")
        for (shard, key), reason in sorted(found.items()):
            loader.skip_bad(str(shard), key, reason)
        self.samples = self.samples.replacing(set(found))

    def next(self):
        """(frames [B, 3, H, W, 3] uint8, keys, and with flow (flow PNG pixels [B, 2, H, W, 3]
        uint8, mirrored [B] bool), else None)."""
        while True:
            if self.iterator is None:
                self._start()
            try:
                (out,) = next(self.iterator)
                break
            except StopIteration:  # a pipeline built mid-epoch ends before the loader's epoch
                self.iterator.reset()
                self.taken = 0
            except RuntimeError as e:
                self._recover(e)
        self.taken += 1
        extras = (out["flow"], out["mirror"].reshape(-1).bool()) if self.flow else None
        return out["frames"], decode_keys(out["info"]), extras

    def end_epoch(self) -> None:
        if self.iterator is not None and self.taken >= len(self.iterator):
            self.iterator.reset()
            self.taken = 0
        else:  # a pipeline built mid-epoch is mid its own: the next epoch gets a fresh one
            self.iterator = self.pipe = None
            self.taken = 0

    def state(self) -> bytes | None:
        return None if self.iterator is None else iterator_checkpoint(self.iterator)
