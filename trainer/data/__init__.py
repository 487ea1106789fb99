"""The data loader the trainer uses: triplet shards in, model-ready Lab batches out.

    loader = TripletLoader(cfg.data, mode="grey", split="train", rank=0, world_size=1,
                           device=torch.device("cuda", 0), seed=0)
    for batch in loader:            # one epoch; the same number of batches on every rank
        batch.cond, batch.target    # [B, 3, C, H, W] on `device`, fp32, in [-1, 1]
        batch.keys                  # sample keys, for logging and debugging
    state = loader.state_dict()     # exact mid-epoch position (per rank), for checkpoints

`flow=True`: batches also carry the flow stored in the shards (`tricolor-shards build
--flow`), cropped and flipped with the frames: `batch.flow`, `batch.flow_mask`.

`shuffle=True, augment=True` (training): shuffled samples, a random crop, flip and brightness
per triplet. `shuffle=False, augment=False` (validation): every epoch gives the same samples
in the same order on the same rank, each the centre crop of `data.crop_size` (window start
(side - crop + 1) // 2), unflipped, unjittered: the same pixels at every validation.

`data.val_samples` > 0: the val split reads a fixed, evenly spaced subset of that many
samples (`select_samples`).

Samples are checked twice. Before the loader starts, its sample list leaves out every
sample the scan finds unfit (`trainer.data.samples`, `shards.check`). While it reads, a sample
that fails anyway (damaged since the shards were indexed: the index and the scan's cache
trust a shard whose size and mtime are unchanged) is skipped, named with its shard and key,
and counted (`TripletLoader.bad`, part of `skipped`); past `data.max_bad_samples` of them
the loader stops with `BadSamplesError`. What each backend catches while reading:

- webdataset: every member's bytes pass through the host, and are checked when read: CRC-32
  against the json's, decoded, every image of the sample's size. Nothing damaged is
  trained on (in shards built before checksums: what still decodes to the right size is).
- DALI: its reader reads the bytes itself, so their CRC-32 cannot be checked on the host.
  A sample DALI fails on (a damaged PNG: libpng checks its chunks' CRCs; a JPEG that will
  not decode; an image too small for the crop window) stops the pipeline. Its shard (the
  one DALI's error names, else every shard of the list) is scanned again on the host, every
  checksum (`trainer.data.samples.rescan`); the damaged samples are named, counted and
  replaced in the index by another sample of their shard, and a new pipeline gives the rest
  of the epoch. Not caught: bytes changed in place (the tar's size and mtime kept) that
  DALI still decodes and crops (damaged JPEG entropy data; an image swapped for another of
  the same byte length, at least as large as the crop): they are trained on.
  `tricolor-shards verify` finds them (it checks every CRC-32 and decodes every image,
  whatever the index says) and rewrites the index without them.
"""

from __future__ import annotations

import importlib.util
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from shards.manifest import ManifestError
from trainer.data.samples import NoSamplesError, SampleSet, scan_split
from trainer.data.transforms import condition_and_target, flow_and_mask

log = logging.getLogger(__name__)


@dataclass
class Batch:
    cond: Tensor  # [B, 3, 1, H, W]: L (grey mode) or line art (line-art mode) of t-1, t, t+1
    target: Tensor  # [B, 3, C, H, W]: a,b (C=2, grey mode) or Lab (C=3, line-art mode)
    keys: list[str]
    # Shards built with --flow only: the flow from frame t to t-1 and to t+1, in pixels (x, y)
    # of the crop [B, 2, 2, H, W], and where it holds (visible in both frames) [B, 2, 1, H, W]
    flow: Tensor | None = None
    flow_mask: Tensor | None = None


class BadSamplesError(NoSamplesError):
    """More samples failed while read than `data.max_bad_samples` allows, or DALI failed on
    a sample that the host cannot name."""


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def select_samples(cfg, split: str, world_size: int) -> SampleSet:
    """The samples a `TripletLoader` of `split` reads at this world size (what every rank
    must agree on). From the shards' `good-samples.json` where it matches them, else by
    scanning (`trainer.data.samples.scan_split`). Validation with `data.val_samples` > 0
    reads a fixed, evenly spaced subset of that many samples (at least one batch per rank):
    the same ones at every validation; the same at every world size when `data.val_samples`
    is a multiple of world size x batch size (else the end of it is trimmed to a multiple of
    the world size, and the last partial batch per rank is not read).

    The trainer calls it on one process and hands the result to the others
    (`select_samples_once`): the index (~200 MB at 10^6 samples) is parsed, or the shards
    scanned, once per job instead of once per rank. The trade-off: what the other nodes see
    is not checked. The index records the size and mtime of each shard as the reader saw
    them, so a node whose shard files differ from the reader's (another local copy, a stale
    mirror) is not detected at start; the shards must be on storage every node shares, or
    identical copies."""
    subset = 0
    if split == "val" and getattr(cfg, "val_samples", 0) > 0:
        subset = max(cfg.val_samples, cfg.batch_size * world_size)
    return scan_split(Path(cfg.shards), split, world_size, subset=subset)


def select_samples_once(cfg, split: str, state) -> SampleSet:
    """`select_samples(cfg, split, world size)` made by the main process alone and broadcast
    to every rank, to pass as `TripletLoader(..., samples=...)`. `state`: an
    `accelerate.Accelerator` or `PartialState` (is_main_process, num_processes). A data error
    of the main process (NoSamplesError, ManifestError; an OSError or ValueError of the scan,
    as a NoSamplesError) is raised on every rank; any other exception is raised there as it
    is and, so that no rank waits for samples that never come, as a RuntimeError on the
    others. Collective: every rank must call it."""
    from accelerate.utils import broadcast_object_list

    samples, error, unexpected = None, None, None
    if state.is_main_process:
        try:
            samples = select_samples(cfg, split, state.num_processes)
        except (NoSamplesError, ManifestError) as e:
            error = e
        except (OSError, ValueError) as e:  # a shard file the scan could not read as expected
            error = NoSamplesError(f"cannot scan the shards: {e}")
        except Exception as e:
            unexpected = e
            error = RuntimeError(f"the main process failed to select the {split} samples: "
                                 f"{type(e).__name__}: {e}")
    [(samples, error)] = broadcast_object_list([(samples, error)])
    if unexpected is not None:
        raise unexpected
    if error is not None:
        raise error
    return samples


class TripletLoader:
    def __init__(
        self,
        cfg,  # DataConfig (trainer.config)
        mode: str,
        split: str,
        rank: int,
        world_size: int,
        device: torch.device,
        seed: int,
        shuffle: bool = True,
        augment: bool = True,
        flow: bool | None = False,  # None: when the shards have it
        samples: SampleSet | None = None,  # `select_samples(cfg, split, world_size)`, made
        # once and handed to every rank (`select_samples_once`)
    ):
        self.cfg, self.mode, self.split = cfg, str(getattr(mode, "value", mode)), split
        self.rank, self.world_size, self.device = rank, world_size, device
        self.seed, self.shuffle, self.augment = seed, shuffle, augment
        self.backend = str(getattr(cfg.backend, "value", cfg.backend))
        if self.backend == "dali" and not dali_available():
            log.warning("DALI is not installed here; using the webdataset backend instead")
            self.backend = "webdataset"
        self.samples: SampleSet = (samples if samples is not None
                                   else select_samples(cfg, split, world_size))
        if flow and not self.samples.flow:
            raise ManifestError(f"{cfg.shards}/manifest.json records no optical flow: rebuild "
                                "the shards with `tricolor-shards build --flow`")
        # read the stored flow (only when something uses it: it costs)
        self.flow = self.samples.flow if flow is None else flow
        small = [s for s in self.samples.frame_sizes if min(s) < cfg.crop_size]
        if small:
            raise NoSamplesError(
                f"{cfg.shards}: frames of size {small} are smaller than data.crop_size = "
                f"{cfg.crop_size}; rebuild the shards with a larger --short-side"
            )
        self.bad: dict[tuple[str, str], str] = {}  # (shard, key) -> why it failed when read
        self.samples_per_rank = len(self.samples) // world_size
        self.steps_per_epoch = self.samples_per_rank // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise NoSamplesError(
                f"{cfg.shards}: {self.samples_per_rank} samples per rank in split {split!r} "
                f"make no full batch of data.batch_size = {cfg.batch_size}"
            )
        self.epoch = 0
        self._step = 0  # batches already given out in the current epoch
        self._resume_from: bytes | None = None
        self._source = None  # the backend's iterator, built lazily (after a possible resume)
        log.info(
            "%s split: %d samples (%d skipped, %d trimmed), %d per rank, %d batches per epoch, "
            "backend %s", split, len(self.samples), self.skipped_total, self.samples.trimmed,
            self.samples_per_rank, self.steps_per_epoch, self.backend,
        )

    @property
    def skipped(self) -> dict[str, int]:
        """Samples left out, by reason: at the scan, and (`... while reading`) since."""
        counts = Counter(self.samples.skipped)
        counts.update(f"{reason.split(' (')[0]} while reading" for reason in self.bad.values())
        return dict(counts)

    @property
    def skipped_total(self) -> int:
        return sum(self.samples.skipped.values()) + len(self.bad)

    def skip_bad(self, shard: str, key: str, reason: str) -> None:
        """Count a sample that failed while read (once per shard and key, however often it is
        met), and stop past `data.max_bad_samples` of them."""
        if (shard, key) in self.bad:
            return
        self.bad[(shard, key)] = reason
        limit = getattr(self.cfg, "max_bad_samples", 100)
        log.warning("%s: sample %s: %s; skipped while reading the %s split (%d such so far)",
                    shard, key, reason, self.split, len(self.bad))
        if len(self.bad) > limit:
            self.fail(f"{shard}: sample {key}: {reason}; {len(self.bad)} samples of the "
                      f"{self.split} split failed while read, more than data.max_bad_samples "
                      f"= {limit}: run `tricolor-shards verify {self.cfg.shards}` (it names "
                      "them and rewrites the index without them), or raise "
                      "data.max_bad_samples")

    def fail(self, message: str) -> None:
        """Stop reading with `BadSamplesError(message)`, raised on this rank alone."""
        if self.rank != 0:  # the trainer prints the data errors of the main process only
            log.error("%s", message)
        raise BadSamplesError(message)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _make_source(self):
        if self.backend == "dali":
            from trainer.data.dali_source import DaliSource

            return DaliSource(self, self._resume_from)
        from trainer.data.wds_source import WebDatasetSource

        return WebDatasetSource(self)

    def __iter__(self):
        if self._source is None:
            self._source = self._make_source()
        while self._step < self.steps_per_epoch:
            frames, keys, extras = self._source.next()
            self._step += 1
            cond, target = condition_and_target(
                frames.to(self.device, non_blocking=True),
                self.mode,
                self.cfg.canny_low,
                self.cfg.canny_high,
            )
            flow = mask = None
            if extras is not None:
                raw, mirrored = (x.to(self.device, non_blocking=True) for x in extras)
                flow, mask = flow_and_mask(raw, mirrored)
            yield Batch(cond, target, keys, flow, mask)
        self._source.end_epoch()
        self.epoch += 1
        self._step = 0

    def _position_keys(self) -> dict:
        """What a saved position depends on: the step counts batches of `batch_size`, the
        DALI state holds the pipeline's batch size, and the webdataset backend replays an
        epoch whose order follows the seed and the number of workers."""
        keys = {
            "world_size": self.world_size,
            "rank": self.rank,
            "backend": self.backend,
            "fingerprint": self.samples.fingerprint(),
            "batch_size": self.cfg.batch_size,
            "flow": self.flow,  # another pipeline (more outputs): its DALI state would not fit
        }
        if self.backend == "webdataset":
            keys.update(seed=self.seed, num_threads=self.cfg.num_threads)
        return keys

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "step": self._step,
            **self._position_keys(),
            "source": self._source.state() if self._source is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume where `state` was saved. The exact position only applies to the same
        samples, world size, rank, backend and batch size (and, for webdataset, seed and
        workers); otherwise the saved epoch restarts cleanly, with a log line."""
        self.epoch, self._step, self._source = state["epoch"], 0, None
        self._resume_from = None
        # A key the state lacks (saved by an older version) counts as changed; but positions
        # saved before flow could be read were all without it.
        state = {"flow": False, **state}
        changed = {k: (state.get(k), v) for k, v in self._position_keys().items()
                   if state.get(k) != v}
        if changed:
            log.warning(
                "data position saved with %s does not apply to this run's %s: restarting "
                "epoch %d from its start",
                ", ".join(f"{k} {old}" for k, (old, _) in changed.items()),
                ", ".join(f"{k} {new}" for k, (_, new) in changed.items()), self.epoch,
            )
        else:
            self._step, self._resume_from = state["step"], state["source"]
