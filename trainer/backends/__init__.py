"""The one place where the two distributed backends differ: plain DDP (ddp.py) and DeepSpeed
ZeRO (deepspeed.py). The launch config picks one (trainer/launch.py). The training loop and the
GAN step are the same for both; a Backend only answers these questions:

    prepare        wrap G, D and their optimizers (DDP modules, or one DeepSpeed engine each)
    autocast       the mixed-precision context for forwards that run outside a wrapper
    backward_step  backward of one network's loss, then at an accumulation boundary gradient
                   clipping, the norm and the optimizer step (DeepSpeed: inside its engine),
                   skipped on every rank when the loss or the gradients are not finite
    end_step       once per training step, after both networks (the fp16 GradScaler's update)
    save_state / check_state / load_state    G, D, G_ema and both optimizers in a checkpoint
                   directory (DCP for DDP, DeepSpeed's own sharded files for DeepSpeed);
                   trainer/checkpoint.py publishes that directory atomically
"""

from __future__ import annotations

from accelerate import Accelerator
from accelerate.utils import DistributedType

from trainer.backends.ddp import DDPBackend
from trainer.backends.deepspeed import DeepSpeedBackend


def make_backend(accelerator: Accelerator):
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return DeepSpeedBackend(accelerator)
    return DDPBackend(accelerator)
