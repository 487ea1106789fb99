"""The webdataset backend of `TripletLoader`: for hosts without DALI (macOS, aarch64).

The webdataset library streams this rank's shards in a torch DataLoader; decoding (PIL),
crop and flip run in the workers. Rank r reads the same contiguous slice of the sample list
as DALI's `shard_id=r`. Everything random is seeded by (seed, epoch, rank, worker or key), and
the DataLoader hands out worker outputs in a fixed round-robin order, so an epoch is a
deterministic sequence: resuming replays it and drops the batches already trained on.

Every member read is checked in the worker before it is used (`checked_images`): its CRC-32
against the one the build recorded, its decoding, its size against the sample's. A sample
that fails is passed on as a failure instead (it keeps its place in the sequence), which
the loader names and counts (`TripletLoader.skip_bad`); the batch takes the next sample.
An epoch that runs out of samples that way takes the rest of its batches from its start.
"""

from __future__ import annotations

import io
import random

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards.check import crc_problem, image_kind, sample_meta
from trainer.data.samples import FLOW_MEMBERS, FRAME_MEMBERS, line_key


def centre_start(side: int, crop: int) -> int:
    """Where the centre crop starts: round-half-up((side - crop) / 2), as DALI's crop_pos 0.5."""
    return (side - crop + 1) // 2


def centre_crop(frames: list[np.ndarray], crop: int) -> np.ndarray:
    """The centre crop of the images (three frames, and the flows), nothing random
    (validation) -> [N, crop, crop, 3]."""
    h, w = frames[0].shape[:2]
    y, x = centre_start(h, crop), centre_start(w, crop)
    return np.ascontiguousarray(np.stack([f[y : y + crop, x : x + crop] for f in frames]))


def crop_and_flip(frames: list[np.ndarray], crop: int, flip: bool, jitter: float, rng,
                  flows: list[np.ndarray] = ()) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """The same random crop and flip for the three frames and the flow images, brightness
    for the frames only -> ([3, crop, crop, 3], [2, crop, crop, 3] or None, mirrored)."""
    h, w = frames[0].shape[:2]
    y, x = rng.randint(0, h - crop), rng.randint(0, w - crop)
    mirror = flip and rng.random() < 0.5
    gain = rng.uniform(1 - jitter, 1 + jitter) if jitter > 0 else 1.0
    out, fl = (np.stack([f[y : y + crop, x : x + crop] for f in images]) if images else None
               for images in (frames, flows))
    if mirror:
        out = out[:, :, ::-1]
        fl = fl[:, :, ::-1] if fl is not None else None
    if gain != 1.0:
        out = np.clip(out.astype(np.float32) * gain, 0, 255).astype(np.uint8)
    return (np.ascontiguousarray(out), None if fl is None else np.ascontiguousarray(fl),
            mirror)


class BadSample(ValueError):
    """A sample whose bytes, as read, are not what the build wrote; the message says why."""


def checked_images(sample: dict, members, crop: int) -> list[np.ndarray]:
    """The decoded images `members` of a webdataset sample, after checking what was read:
    each member's CRC-32 (where the build recorded it), its decoding, and every image of the
    json's size (and at least the crop); BadSample saying which member failed how."""
    missing = [m for m in (*members, "json") if m not in sample]
    if missing:
        raise BadSample(f"missing component {', '.join(missing)}")
    blobs = {m: (sample[m], 0, len(sample[m])) for m in (*members, "json")}
    meta, problem = sample_meta(blobs["json"])
    problem = problem or crc_problem(blobs, meta, members)
    if problem:
        raise BadSample(problem)
    size = (meta["width"], meta["height"])
    images = []
    for m in members:
        try:
            image = np.asarray(Image.open(io.BytesIO(sample[m])).convert("RGB"))
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad data
            raise BadSample(f"undecodable {image_kind(m)} ({m}: {e})") from None
        got = image.shape[1], image.shape[0]
        if got != size or min(got) < crop:
            raise BadSample(f"wrong size ({m}: {got[0]}x{got[1]}, the json says "
                            f"{size[0]}x{size[1]}, the crop is {crop})")
        images.append(image)
    return images


class _RankSamples(IterableDataset):
    def __init__(self, tars, keys, cfg, seed, epoch, rank, shuffle, augment, flow=False):
        self.tars, self.cfg, self.shuffle, self.augment = tars, cfg, shuffle, augment
        self.flow = flow
        self.position = {k: i for i, k in enumerate(keys)}
        self.seed = (seed, epoch, rank)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = {k for k, i in self.position.items() if i % workers == worker}
        pipeline = wds.WebDataset(
            self.tars, shardshuffle=False, nodesplitter=None, workersplitter=None,
            empty_check=False,
            # The start-up scan already reported and excluded every damaged sample; what
            # webdataset trips over here (e.g. the cut end of a truncated tar) is among them.
            handler=wds.ignore_and_continue,
        ).select(lambda s: s["__key__"] in mine)  # bad or trimmed samples are not in `mine`
        if self.shuffle:
            pipeline = pipeline.shuffle(1000, rng=random.Random(str((*self.seed, worker))))
        cfg = self.cfg
        members = FRAME_MEMBERS + (FLOW_MEMBERS if self.flow else ())
        for sample in pipeline:
            rng = random.Random(str((*self.seed, sample["__key__"])))
            try:
                images = checked_images(sample, members, cfg.crop_size)
            except BadSample as e:  # the loader counts it; the batch takes the next one
                yield None, sample["__key__"], (sample.get("__url__", "?"), str(e))
                continue
            frames, flows = images[:3], images[3:]
            if self.augment:
                triplet, flow, mirror = crop_and_flip(frames, cfg.crop_size, cfg.flip,
                                                      cfg.brightness_jitter, rng, flows)
            else:
                triplet, mirror = centre_crop(frames, cfg.crop_size), False
                flow = centre_crop(flows, cfg.crop_size) if flows else None
            extras = None if flow is None else (torch.from_numpy(flow), mirror)
            yield torch.from_numpy(triplet), sample["__key__"], extras


class WebDatasetSource:
    def __init__(self, loader):
        self.loader = loader
        keys = loader.samples.keys()
        n = loader.samples_per_rank
        self.keys = keys[loader.rank * n : (loader.rank + 1) * n]
        wanted = set(self.keys)
        self.tars = [
            str(s.tar) for s in loader.samples.shards
            if any(line_key(line) in wanted for line in s.lines)
        ]
        self._start_epoch(skip_batches=loader._step)

    def _start_epoch(self, skip_batches: int = 0) -> None:
        self._new_pass()
        for _ in range(skip_batches * self.loader.cfg.batch_size):  # replay up to the saved step
            self._next_sample()

    def _new_pass(self) -> None:
        """Read the current epoch's samples from its start."""
        loader = self.loader
        dataset = _RankSamples(self.tars, self.keys, loader.cfg, loader.seed, loader.epoch,
                               loader.rank, loader.shuffle, loader.augment, loader.flow)
        workers = loader.cfg.num_threads
        self._samples = iter(DataLoader(dataset, batch_size=None, num_workers=workers,
                                        persistent_workers=False))
        self._good = 0  # sound samples given out in this pass

    def _next_sample(self):
        """The next sound sample of the epoch; those that failed when read are counted."""
        while True:
            try:
                frames, key, extras = next(self._samples)
            except StopIteration:
                # Samples failed this epoch, so it ran short: its remaining batches take
                # samples from its start again (the same sequence), as every rank must give
                # as many batches.
                if self._good == 0:
                    self.loader.fail(f"{self.loader.cfg.shards}: every sample of rank "
                                     f"{self.loader.rank}'s {self.loader.split} samples failed "
                                     "while read: run `tricolor-shards verify "
                                     f"{self.loader.cfg.shards}`")
                self._new_pass()
                continue
            if frames is None:
                shard, reason = extras
                self.loader.skip_bad(shard, key, reason)
                continue
            self._good += 1
            return frames, key, extras

    def next(self):
        # Batched here, not in the workers: per-worker batches would leave a partial batch
        # in every worker and change the number of batches per epoch.
        if self._samples is None:
            self._start_epoch()
        frames, keys, extras = zip(*(self._next_sample()
                                     for _ in range(self.loader.cfg.batch_size)))
        if extras[0] is None:
            return torch.stack(frames), list(keys), None
        flows, mirrors = zip(*extras)
        return torch.stack(frames), list(keys), (torch.stack(flows), torch.tensor(mirrors))

    def end_epoch(self) -> None:
        self._samples = None  # the next call starts the loader's next epoch

    def state(self):
        return None  # the position is (epoch, step), which the loader saves itself
