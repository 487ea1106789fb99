"""The DALI pipeline: triplet shards -> decoded, identically cropped and flipped RGB triplets.

Training (`augment=True`): a random crop position, flip and brightness gain per sample, the
same for its three frames. Validation (`augment=False`): the centre crop (crop_pos 0.5: the
window starts at round-half-up((side - crop) / 2)), no flip, no jitter, read in index order;
`stick_to_shard` keeps every rank on its own slice at every epoch (DALI otherwise moves each
rank to the next slice each epoch), so every validation scores the same pixels on the same
ranks.

`device="mixed"` decodes the JPEGs on the GPU (nvJPEG); on a host without one the same
pipeline runs with `device="cpu"` and `device_id=None`. Each rank reads its own slice of the
samples (`shard_id` = rank, `num_shards` = world size); the reader named "Reader" lets the
iterator know the epoch length, and `pad_last_batch` + DROP give every rank the same number of
batches per epoch.
"""

from __future__ import annotations

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from trainer.data.samples import FLOW_MEMBERS, FRAME_MEMBERS

READER = "Reader"


def build_pipeline(
    tars: list[str],
    indexes: list[str],
    *,
    batch_size: int,
    crop_size: int,
    flip: bool,
    brightness_jitter: float,
    rank: int,
    world_size: int,
    device_id: int | None,
    num_threads: int,
    seed: int,
    shuffle: bool = True,
    augment: bool = True,
    checkpoint: bytes | None = None,
    flow: bool = False,
    mmap: bool = True,
):
    decoder_device = "mixed" if device_id is not None else "cpu"
    members = FRAME_MEMBERS + (FLOW_MEMBERS if flow else ())

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        seed=seed + rank,
        enable_checkpointing=True,
        prefetch_queue_depth=2,
    )
    def triplets():
        prev, cur, nxt, *flows = fn.readers.webdataset(
            paths=tars,
            index_paths=indexes,
            ext=list(members),
            missing_component_behavior="error",  # bad samples were already left out of the index
            shard_id=rank,
            num_shards=world_size,
            random_shuffle=shuffle,
            stick_to_shard=not shuffle,
            initial_fill=1024,
            pad_last_batch=True,
            # data.mmap: false reads the tars with plain reads, which network filesystems
            # (Lustre, NFS) serve better than mapped random reads
            dont_use_mmap=not mmap,
            name=READER,
        )
        # "<tar>:<offset>:<key>.cur.jpg", padded with zeros to the longest in the batch.
        info = fn.pad(fn.get_property(cur, key="source_info"), fill_value=0)
        if augment:
            # One draw per sample, shared by its three frames: a triplet cropped or flipped
            # differently per frame would teach the model flicker.
            crop_x = fn.random.uniform(range=(0.0, 1.0))
            crop_y = fn.random.uniform(range=(0.0, 1.0))
            mirror = fn.random.coin_flip(probability=0.5 if flip else 0.0)
            gain = fn.random.uniform(range=(1.0 - brightness_jitter, 1.0 + brightness_jitter))
        else:  # the same pixels at every validation: the centre crop, nothing random
            crop_x = crop_y = 0.5
        def decode(encoded):
            # ROI decoding: only the crop window is decoded; the flow PNGs (shards/flow.py)
            # take the frames' decoder, window and flip, so they cannot come apart.
            image = fn.decoders.image_crop(
                encoded,
                device=decoder_device,
                output_type=types.RGB,
                crop=(crop_size, crop_size),
                crop_pos_x=crop_x,
                crop_pos_y=crop_y,
            )
            return fn.flip(image, horizontal=mirror) if augment else image

        frames = []
        for encoded in (prev, cur, nxt):
            image = decode(encoded)
            if augment and brightness_jitter > 0:  # the frames only: never the flow
                image = fn.brightness(image, brightness=gain)
            frames.append(image)
        outputs = [fn.stack(*frames), info]  # [3, H, W, 3] uint8 per sample
        if flow:  # [2, H, W, 3] uint8, and whether the sample was mirrored (its x negates)
            outputs += [fn.stack(*(decode(f) for f in flows)),
                        mirror if augment else fn.constant(idata=0, dtype=types.INT32)]
        return tuple(outputs)

    pipe = triplets(checkpoint=checkpoint) if checkpoint else triplets()
    pipe.build()
    return pipe


def build_iterator(pipe, flow: bool = False) -> DALIGenericIterator:
    return DALIGenericIterator(
        [pipe],
        ["frames", "info", *(["flow", "mirror"] if flow else [])],
        reader_name=READER,
        last_batch_policy=LastBatchPolicy.DROP,
        auto_reset=False,
    )


def decode_keys(info: torch.Tensor) -> list[str]:
    """Sample keys from the padded `source_info` bytes [B, N] uint8."""
    keys = []
    for row in info.cpu().numpy():
        text = bytes(row).rstrip(b"\0").decode()
        member = text.rsplit(":", 1)[-1]
        keys.append(member.rsplit("/", 1)[-1].split(".", 1)[0])
    return keys


def iterator_checkpoint(iterator: DALIGenericIterator) -> bytes:
    (state,) = iterator.checkpoints()
    return state.encode() if isinstance(state, str) else state
