"""The recipes `make quality` trains: each variant a preset plus `key=value` overrides (the same
as trainer/main.py takes); `{steps}`, `{crop}`, `{crop2}` and `{quarter}` in an override
stand for the run's budget."""

from __future__ import annotations

import argparse

V0, DEMO = "configs/demo_v0.yaml", "configs/demo.yaml"
THREE_FRAME = "configs/seed_recipe.yaml"  # the 3-frame GAN's recipe as settings of ours

# name: (preset, overrides, what it is). One line per variant; the recipe options are each
# tried alone on top of today's recipe (demo_v0), so each row measures one change.
VARIANTS: dict[str, tuple[str, list[str], str]] = {
    "demo_v0": (V0, [], "the demo recipe before the zero-initialized head and EMA, frozen"),
    "default": (DEMO, [], "configs/demo.yaml as it is now (demo_v0 + zero_init_head)"),
    "per_frame": (DEMO, ["model.temporal=false", "model.memory=false"],
                  "default recipe, G sees frame t only (no neighbours, no memory)"),
    "seed_recipe": (THREE_FRAME, [], "the 3-frame GAN's lr, batch, norm, loss weights, no EMA"),
    "zero_init_head": (V0, ["model.zero_init_head=true"], "demo_v0 + G starts at grey"),
    "adv_warmup": (V0, ["loss.adv_start_step={quarter}"],
                   "demo_v0 + no adversarial term in the first quarter of the steps"),
    "chroma_loss": (V0, ["loss.lambda_chroma=10"], "demo_v0 + chroma-magnitude L1, weight 10"),
    "lr_d_low": (V0, ["optim.lr_d=5e-5"], "demo_v0 + D learns 4x slower than G"),
    "crop_x2": (V0, ["data.crop_size={crop2}", "data.batch_size=1"],
                "demo_v0 + 2x crop side, 1/4 batch: the same pixels per step"),
    "adv_low": (V0, ["loss.lambda_adv=0.2"], "demo_v0 + adversarial weight 0.2 (pixel 20)"),
    "zi_l2": (DEMO, ["model.zero_init_head=true", "loss.pixel=l2"],
              "zero_init_head + L2 pixel loss (the conditional mean: what PSNR rewards)"),
    "zi_l2_adv_low": (DEMO, ["model.zero_init_head=true", "loss.pixel=l2",
                             "loss.lambda_adv=0.2"], "zi_l2 + adversarial weight 0.2"),
    "zi_no_adv": (DEMO, ["model.zero_init_head=true", "loss.lambda_adv=0"],
                  "zero_init_head, pixel loss only (no adversarial term)"),
    "zi_crop_x2": (DEMO, ["model.zero_init_head=true", "data.crop_size={crop2}",
                          "data.batch_size=1"], "zero_init_head + crop_x2"),
    "zi_depth5": (DEMO, ["model.zero_init_head=true", "model.depth=5"],
                  "zero_init_head + G depth 5 (bottleneck at 1/32: more context)"),
    "zi_lr_half": (DEMO, ["model.zero_init_head=true", "optim.lr_g=1e-4", "optim.lr_d=1e-4"],
                   "zero_init_head + half the learning rates"),
    "combo": (V0, ["model.zero_init_head=true", "loss.adv_start_step={quarter}",
                   "loss.lambda_chroma=10", "optim.lr_d=5e-5"],
              "demo_v0 + zero_init_head + adv_warmup + chroma_loss + lr_d_low"),
    "no_memory": (DEMO, ["model.memory=false"], "configs/demo.yaml without colour memory"),
    "memory": (DEMO, ["model.memory=true", "model.p_drop=0.2", "model.scheduled_sampling=0.2"],
               "configs/demo.yaml with colour memory: G also gets the colour of t-1 (in "
               "training none 20 %, its own prediction 20 %, the truth 60 %)"),
    "memory_ss50": (DEMO, ["model.memory=true", "model.p_drop=0.25",
                           "model.scheduled_sampling=0.5"],
                    "colour memory, in training none 25 %, its own 50 %, the truth 25 %"),
    "temporal": (DEMO, ["model.memory=false", "loss.lambda_temporal=10"],
                 "no_memory + the flow-warped, occlusion-masked temporal L1, weight 10"),
    "temporal_50": (DEMO, ["model.memory=false", "loss.lambda_temporal=50"],
                    "no_memory + the temporal L1, weight 50"),
    "temporal_memory": (DEMO, ["model.memory=true", "model.p_drop=0.2",
                               "model.scheduled_sampling=0.2", "loss.lambda_temporal=10"],
                        "memory + the temporal L1, weight 10"),
    "lineart": (DEMO, ["model.mode=lineart", "model.p_drop=0.2", "model.scheduled_sampling=0.2"],
                "line-art mode (TCVC), its memory fed as in `memory`"),
    "lineart_tcvc": (DEMO, ["model.mode=lineart"],
                     "line-art mode, TCVC's scheme: none 50 %, the truth 50 %"),
    "lineart_no_prev": (DEMO, ["model.mode=lineart", "model.temporal=false"],
                        "line-art control: G never gets a previous colour"),
}
MULTI_SEED = {"no_memory", "memory"}  # trained --seeds times; the others once (seed 0)
# What `make quality` runs: colour memory or not, line art with memory and its control; each
# memory row also under the keyframe protocol. The recipe options' rows
# (demo_v0, seed_recipe, adv_warmup, chroma_loss, crop_x2) and the other candidates are run
# with `--variants`; their figures: docs/quality-explored.md.
DEFAULT_VARIANTS = ["no_memory", "memory", "per_frame", "temporal", "temporal_memory",
                    "lineart", "lineart_no_prev"]
LINEART = {name for name, (_, over, _) in VARIANTS.items() if "model.mode=lineart" in over}
# Variants whose G has a colour memory: scored under the keyframe protocol too.
MEMORY = {name for name, (_, over, _) in VARIANTS.items()
          if (name in LINEART or "model.memory=true" in over)
          and "model.temporal=false" not in over}
KEYFRAMES = "first"  # tricolor-eval --keyframes: the truth's first frame of every scene
KF = " · keyframes"  # suffix of a variant's rows under the keyframe protocol


def overrides(name: str, args: argparse.Namespace) -> list[str]:
    budget = {"steps": args.steps, "crop": args.crop, "crop2": 2 * args.crop,
              "quarter": max(1, args.steps // 4)}
    return [o.format(**budget) for o in VARIANTS[name][1]]
