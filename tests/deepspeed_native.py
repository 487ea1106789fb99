"""Run under `accelerate launch --config_file launch/deepspeed_zeroN.yaml` by
tests/test_deepspeed.py: trainer/main.py with DeepSpeed's native bf16 (weights in bf16, the
fp32 master copy in the ZeRO optimizer) in place of torch_autocast for
train.mixed_precision=bf16. That is the code path of mixed_precision=fp16 on GPUs (DeepSpeed
refuses fp16 on a CPU) without the loss scaler: the spectral-norm buffers follow the weights'
dtype, the EMA stays fp32, D's direct call in the G step autocasts, checkpoints round-trip.
"""

import sys

from trainer import launch

launch.DEEPSPEED_PRECISION["bf16"] = {"bf16": {"enabled": True}, "fp16": {"enabled": False}}

from trainer.main import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
