"""Run under `accelerate launch --config_file launch/deepspeed_zero2.yaml` (2 CPU processes)
by tests/test_deepspeed.py: a checkpoint save whose write fails on rank 1 only.

Rank 1 may write at most 10 kB per file (RLIMIT_FSIZE: a real EFBIG from the kernel, also for
root) while both ranks save step 2; its ZeRO partition is larger. Then the limit is lifted,
the ranks resume and save step 3. Writes report-<rank>.json: what each rank saw.
"""

import json
import resource
import signal
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from trainer.checkpoint import Checkpointer, CheckpointError
from trainer.config import load_config
from trainer.launch import make_accelerator
from trainer.train import build_gan

out_dir = Path(sys.argv[1])
cfg = load_config("configs/demo.yaml", ["data.shards=unused", "data.crop_size=32",
                                        "data.batch_size=2", "model.ngf=8", "model.ndf=8"])
accelerator = make_accelerator(cfg, "no")
rank = accelerator.process_index
gan = build_gan(cfg, accelerator)
assert gan.backend.name == "deepspeed", gan.backend
checkpointer = Checkpointer(out_dir / "run")
model = OmegaConf.to_container(OmegaConf.structured(cfg.model), enum_to_str=True)


def save(step: int) -> str:
    try:
        path = checkpointer.save(step, gan, {"step": step, "model": model},
                                 {"epoch": 0, "step": step, "source": None})
    except CheckpointError as e:
        return str(e)
    return path.name


report = {"rank": rank, "first": save(1)}
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
if rank == 1:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, hard))
report["failed"] = save(2)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
torch.distributed.barrier()  # rank 0 may still be removing step_000002.tmp
report["left"] = sorted(p.name for p in checkpointer.dir.iterdir())
path, (state, _, _) = checkpointer.restore(gan, cfg.model)
report["resumed"] = [path.name, state["step"]]
report["then"] = save(3)
(out_dir / f"report-{rank}.json").write_text(json.dumps(report))
