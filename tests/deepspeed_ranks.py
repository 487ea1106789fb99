"""Run under `accelerate launch --config_file launch/deepspeed_zeroN.yaml` (2 CPU processes)
by tests/test_deepspeed.py.

With G and D as DeepSpeed engines, checks that D's weights, spectral-norm u, v and sigmas (and
G's weights) are bitwise identical on every rank: after start-up (ranks seeded differently),
after training steps, after a non-finite loss on one rank (skipped by all), after a
rank-0-only train-mode forward once broadcast, and after saving a DeepSpeed checkpoint and
loading it into freshly built engines. Writes report-<rank>.json.
"""

import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from models import d_in_channels
from trainer.checkpoint import Checkpointer
from trainer.config import load_config
from trainer.data import TripletLoader
from trainer.launch import make_accelerator
from trainer.sn_sync import broadcast_spectral_norm, ranks_disagree
from trainer.step import train_step
from trainer.train import build_gan

shards, out_dir = sys.argv[1], Path(sys.argv[2])
cfg = load_config("configs/demo.yaml", [f"data.shards={shards}", "data.crop_size=32",
                                        "data.batch_size=2", "model.ngf=8", "model.ndf=8"])
accelerator = make_accelerator(cfg, "no")
rank = accelerator.process_index
torch.manual_seed(100 + rank)  # ranks start from different random u, v (and weights)
gan = build_gan(cfg, accelerator)
assert gan.backend.name == "deepspeed", gan.backend
D = gan.backend.unwrap(gan.D)
report = {"start": ranks_disagree(D)}
loader = TripletLoader(cfg.data, "grey", "train", rank, 2, accelerator.device, 0)


def batches():  # the session's shards may hold as few as 3 batches per rank: cycle epochs
    while True:
        yield from loader


batches = batches()
for _ in range(3):
    train_step(accelerator, gan, next(batches))
report["after_steps"] = ranks_disagree(D)
report["G_after_steps"] = ranks_disagree(gan.backend.unwrap(gan.G))

# A non-finite loss on rank 1 only: every rank skips both phases, nothing changes.
bad = next(batches)
if rank == 1:
    bad.cond[0, 1, 0, 0, 0] = float("nan")
before = [p.detach().clone() for p in gan.backend.unwrap(gan.G).parameters()]
out = train_step(accelerator, gan, bad)
report["nan_skipped"] = sorted(k for k, v in out.items() if k.startswith("Skipped/") and v > 0)
report["nan_G_unchanged"] = all(
    torch.equal(a, b) for a, b in zip(before, gan.backend.unwrap(gan.G).parameters()))
out = train_step(accelerator, gan, next(batches))
report["next_step_trains"] = not out.get("Skipped/G", 0) and not all(
    torch.equal(a, b) for a, b in zip(before, gan.backend.unwrap(gan.G).parameters()))
report["after_skip"] = ranks_disagree(D)
if accelerator.is_main_process:  # a single-rank forward in train mode moves u on rank 0 only
    D.train()(torch.randn(2, d_in_channels(cfg.model), 32, 32))
report["rank0_forward_unsynced"] = ranks_disagree(D)
broadcast_spectral_norm(D)
report["rank0_forward_synced"] = ranks_disagree(D)

checkpointer = Checkpointer(out_dir / "run")
model = OmegaConf.to_container(OmegaConf.structured(cfg.model), enum_to_str=True)
path = checkpointer.save(3, gan, {"step": 3, "model": model}, loader.state_dict())
torch.manual_seed(200 + rank)
gan2 = build_gan(cfg, accelerator)
D2 = gan2.backend.unwrap(gan2.D)
checkpointer.load(path, gan2, cfg.model)
broadcast_spectral_norm(D2)  # what trainer.train.resume does after loading
report["after_resume"] = ranks_disagree(D2)
report["resumed_equals_saved"] = all(
    torch.equal(a, b) for a, b in zip(D.state_dict().values(), D2.state_dict().values()))
train_step(accelerator, gan2, next(batches))
report["after_resume_step"] = ranks_disagree(D2)
(out_dir / f"report-{rank}.json").write_text(json.dumps({"rank": rank, **report}))
