"""Run under `accelerate launch` (DDP or a DeepSpeed config, 2 CPU processes) by
tests/test_deepspeed.py: six batches with train.grad_accum=2, the loss made non-finite on
rank 1 at the second batch (an accumulation boundary), so both phases are skipped there and
the window's first batch must be dropped. Rank 0 writes G's and D's weights to OUT_FILE."""

import sys

import torch
from safetensors.torch import save_file

from trainer.config import load_config
from trainer.data import TripletLoader
from trainer.launch import make_accelerator
from trainer.step import train_step
from trainer.train import build_gan

shards, out_file = sys.argv[1], sys.argv[2]
cfg = load_config("configs/demo.yaml", [f"data.shards={shards}", "data.crop_size=32",
                                        "data.batch_size=2", "model.ngf=8", "model.ndf=8",
                                        "train.grad_accum=2"])
accelerator = make_accelerator(cfg, "no")
torch.manual_seed(accelerator.process_index)
gan = build_gan(cfg, accelerator)
loader = TripletLoader(cfg.data, "grey", "train", accelerator.process_index, 2,
                       accelerator.device, 0)


def batches():  # the session's shards may hold as few as 3 batches per rank: cycle epochs
    while True:
        yield from loader


skipped = []
for i, batch in zip(range(6), batches()):
    if i == 1 and accelerator.process_index == 1:
        batch.cond[0, 1, 0, 0, 0] = float("nan")
    out = train_step(accelerator, gan, batch)
    # the step reports every Skipped/* flag as a device tensor, 1.0 where it skipped
    skipped.append(sorted(k for k, v in out.items() if k.startswith("Skipped/") and v == 1))
assert skipped == [[], ["Skipped/D", "Skipped/G"], [], [], [], []], skipped
if accelerator.is_main_process:
    weights = {f"{net}.{k}": v.detach().contiguous()
               for net, model in (("G", gan.G), ("D", gan.D))
               for k, v in gan.backend.unwrap(model).state_dict().items()}
    save_file(weights, out_file)
