"""Run under `accelerate launch` with 2 CPU processes by tests/test_trainer.py.

Checks that D's weights, spectral-norm u, v and sigmas are bitwise identical on every rank
after start-up, after training steps, after a rank-0-only train-mode forward, and after a
resume; with `--no-sync` it runs the negative twin (ranks seeded differently, no broadcast)
and reports the disagreement, proving the check can fail. Writes report-<rank>.json.
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from omegaconf import OmegaConf

from models import d_in_channels
from trainer.checkpoint import Checkpointer
from trainer.config import load_config
from trainer.data import TripletLoader
from trainer.sn_sync import broadcast_spectral_norm, ranks_disagree
from trainer.step import train_step
from trainer.train import build_gan

shards, ckpt_dir, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
torch.manual_seed(100 + rank)  # ranks start from different random u, v (and weights)
cfg = load_config("configs/demo.yaml", [f"data.shards={shards}", "data.crop_size=32",
                                        "data.batch_size=2", "model.ngf=8", "model.ndf=8"])
report = {}
if mode == "--no-sync":
    from models import build_discriminator

    D = build_discriminator(cfg.model)  # no prepare, no broadcast: nothing keeps ranks equal
    report["start"] = ranks_disagree(D)
    D.train()(torch.randn(2, d_in_channels(cfg.model), 32, 32))
    (ckpt_dir / f"report-{rank}.json").write_text(json.dumps({"rank": rank, **report}))
    sys.exit(0)

gan = build_gan(cfg, accelerator)
D = accelerator.unwrap_model(gan.D)
report["start"] = ranks_disagree(D)
loader = TripletLoader(cfg.data, "grey", "train", rank, 2, accelerator.device, 0)
def endless(loader):
    while True:  # the split may hold fewer batches per epoch than the steps below
        yield from loader


batches = endless(loader)
for _ in range(3):
    train_step(accelerator, gan, next(batches))
report["after_steps"] = ranks_disagree(D)
report["G_after_steps"] = ranks_disagree(accelerator.unwrap_model(gan.G))
if accelerator.is_main_process:  # a single-rank forward in train mode moves u on rank 0 only
    D.train()(torch.randn(2, d_in_channels(cfg.model), 32, 32))
report["rank0_forward_unsynced"] = ranks_disagree(D)
broadcast_spectral_norm(D)
report["rank0_forward_synced"] = ranks_disagree(D)
# Save a real sharded checkpoint, then resume into a fresh GAN (seeded per rank again).
checkpointer = Checkpointer(ckpt_dir / "run")
model = OmegaConf.to_container(OmegaConf.structured(cfg.model), enum_to_str=True)
path = checkpointer.save(3, gan, {"step": 3, "model": model}, loader.state_dict())
torch.manual_seed(200 + rank)
gan2 = build_gan(cfg, accelerator)
D2 = accelerator.unwrap_model(gan2.D)
checkpointer.load(path, gan2, cfg.model)
broadcast_spectral_norm(D2)  # what trainer.train.resume does after loading
report["after_resume"] = ranks_disagree(D2)
train_step(accelerator, gan2, next(batches))
report["after_resume_step"] = ranks_disagree(D2)
(ckpt_dir / f"report-{rank}.json").write_text(json.dumps({"rank": rank, **report}))
