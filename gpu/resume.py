"""The resume_exactness stage of `make gpu-check`: a resume from an in-memory snapshot against
no resume, with the trainer's GAN, and the tolerance a CUDA resume is held to."""

from __future__ import annotations

import contextlib
import json
import os
import warnings

from gpu.context import DEMO, Context, endless

# CUDA resume tolerance (docs/gpu-check.md): max |A - B| / max |A| over each network's
# floating-point state (G, D, the EMA copy), after RESUME_STEPS steps from the restored
# snapshot. On the CPU a resume is bitwise exact (README: Resume), so there it is 0.
RESUME_TOLERANCE = {"bf16": 1e-2, "fp32": 1e-4}
RESUME_WARMUP, RESUME_STEPS = 3, 5  # steps before the snapshot, steps after it (twice)
GATED = ("G", "D", "G_ema")  # what the tolerance applies to; the optimizers' moments are figures
NONDETERMINISTIC = "does not have a deterministic implementation"


def fresh_accelerator(precision: str, cpu: bool):
    """A new Accelerator of this precision: Accelerate keeps one state per process."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    return Accelerator(mixed_precision="no" if precision == "fp32" else precision, cpu=cpu)


def training_state(gan) -> dict[str, dict]:
    """Every tensor a resume restores, by part: G, D, G_ema (with its update count) and both
    optimizers' states (flattened: "<param index>.<name>"). References, not copies."""
    unwrap = gan.backend.unwrap
    out = {"G": dict(unwrap(gan.G).state_dict()), "D": dict(unwrap(gan.D).state_dict()),
           "G_ema": dict(gan.ema.state_dict())}
    for name, opt in (("opt_G", gan.opt_G), ("opt_D", gan.opt_D)):
        out[name] = {f"{i}.{k}": v for i, state in opt.state_dict()["state"].items()
                     for k, v in state.items() if hasattr(v, "dtype")}
    return out


def snapshot(gan, cuda: bool) -> dict:
    """The whole training state in memory (what a checkpoint holds): deep copies of the
    networks', the EMA's and the optimizers' state_dicts, the backend's (fp16 scaler) and the
    RNG states."""
    import copy

    import torch

    unwrap = gan.backend.unwrap
    return copy.deepcopy({
        "G": unwrap(gan.G).state_dict(), "D": unwrap(gan.D).state_dict(),
        "G_ema": gan.ema.state_dict(), "opt_G": gan.opt_G.state_dict(),
        "opt_D": gan.opt_D.state_dict(), "backend": gan.backend.trainer_state(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if cuda else None,
    })


def restore(gan, state: dict) -> None:
    import torch

    unwrap = gan.backend.unwrap
    unwrap(gan.G).load_state_dict(state["G"])
    unwrap(gan.D).load_state_dict(state["D"])
    gan.ema.load_state_dict(state["G_ema"])
    gan.opt_G.load_state_dict(state["opt_G"])
    gan.opt_D.load_state_dict(state["opt_D"])
    gan.backend.load_trainer_state(state["backend"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] is not None:
        torch.cuda.set_rng_state_all(state["rng_cuda"])


def state_differences(a: dict[str, dict], b: dict[str, dict]) -> dict[str, dict]:
    """Per part: max |a - b| over its floating-point tensors, that over max |a| ("max_rel"),
    the tensor where it is largest ("" when none differs), and whether every tensor (integer
    ones too) is equal."""
    out = {}
    for part, tensors in a.items():
        num, den, worst, bitwise = 0.0, 0.0, "", True
        for name, x in tensors.items():
            y = b[part][name]
            bitwise = bitwise and x.shape == y.shape and bool((x == y).all())
            if x.is_floating_point() and x.numel():
                d = float((x.double() - y.double()).abs().max())
                den = max(den, float(x.double().abs().max()))
                if d > num:
                    num, worst = d, name
        out[part] = {"max_abs": num, "max_rel": num / den if den > 0 else num,
                     "bitwise": bitwise, "worst": worst}
    return out


def ema_forward_checks(ctx: Context, gan, batch, label: str) -> dict:
    """The EMA copy runs the class's forward in fp32, not the training G's autocast wrapper
    that Accelerate puts on the instance (and `copy.deepcopy` would carry over): an EMA copy
    with that wrapper would validate and export under autocast."""
    import torch

    from trainer.step import generate

    ema = gan.ema.model
    instance = sorted(k for k in ("forward", "_original_forward") if k in ema.__dict__)
    ctx.check(f"{label}: gan.ema.model.forward is the class's forward (no instance forward)",
              not instance and getattr(ema.forward, "__func__", None) is type(ema).forward,
              f"instance attributes: {instance}" if instance else "")
    with torch.no_grad():
        out, _ = generate(gan, ema, batch)
    dtypes = sorted({str(p.dtype) for p in ema.parameters()})
    ctx.check(f"{label}: the EMA output is float32", out.dtype == torch.float32, out.dtype)
    ctx.check(f"{label}: the EMA parameters are float32", dtypes == ["torch.float32"], dtypes)
    return {"training_G_has_instance_forward":
            "forward" in gan.backend.unwrap(gan.G).__dict__,
            "ema_instance_attributes": instance, "ema_output_dtype": str(out.dtype)}


def resume_run(ctx: Context, cfg, precision: str, batches: list, warmup: int, steps: int,
               ema_check: bool = False) -> tuple[dict, dict]:
    """Build the GAN as the trainer does, `warmup` steps, snapshot, `steps` more (A), restore,
    the same `steps` on the same batches (B): (differences of A and B, the EMA forward's
    figures when `ema_check`)."""
    import torch

    from bench.common import sync, torch_device
    from trainer.step import train_step
    from trainer.train import build_gan

    cuda = ctx.device == "cuda"
    accelerator = fresh_accelerator(precision, cpu=not cuda)
    torch.manual_seed(0)
    gan = build_gan(cfg, accelerator)
    ema_figures = ema_forward_checks(ctx, gan, batches[0], precision) if ema_check else {}
    for i in range(warmup):
        train_step(accelerator, gan, batches[i], i)
    saved = snapshot(gan, cuda)
    runs = []
    for _ in range(2):
        for i in range(warmup, warmup + steps):
            train_step(accelerator, gan, batches[i], i)
        sync(torch_device(ctx.device))
        runs.append({part: {k: v.detach().clone() for k, v in tensors.items()}
                     for part, tensors in training_state(gan).items()})
        restore(gan, saved)
    return state_differences(*runs), ema_figures


@contextlib.contextmanager
def algorithms(deterministic: bool, warn_only: bool, cuda: bool):
    """torch.use_deterministic_algorithms and cuDNN's switches for a block; the default mode
    times cuDNN's algorithms as the trainer does on CUDA (trainer/main.py)."""
    import torch

    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.backends.cudnn.benchmark = cuda and not deterministic
    torch.backends.cudnn.deterministic = deterministic
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[2:]


def nondeterministic_op(message: str) -> str:
    """The op named by torch's "X does not have a deterministic implementation" message."""
    return message.split(NONDETERMINISTIC)[0].strip().split()[-1] if NONDETERMINISTIC in \
        message else message.strip().splitlines()[0]


def resume_exactness(ctx: Context) -> dict:
    """Resume against no resume, in memory, with the trainer's GAN (build_gan, a bf16 or fp32
    Accelerator): RESUME_WARMUP steps, a snapshot of the whole training state (deep copies of
    G, D, EMA, both optimizers' state_dicts, the RNG states), RESUME_STEPS steps -> A; restore,
    the same steps on the same pre-fetched batches -> B. Max |A - B| per network, (a) with the
    default algorithms (cudnn.benchmark as the trainer), (b) with
    torch.use_deterministic_algorithms(True) (CUBLAS_WORKSPACE_CONFIG set before CUDA starts);
    where (b) raises for an op without a deterministic kernel, which op, and (b) again with
    warn_only=True (every such op, and what it gives). Passes when (a) is within
    RESUME_TOLERANCE (on the CPU: bitwise), and the bf16 EMA copy runs the class's forward in
    fp32 (`ema_forward_checks`)."""
    cuda = ctx.device == "cuda"
    if cuda:  # read when cuBLAS starts: before anything touches CUDA in this process
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch
    from accelerate.state import AcceleratorState

    from trainer.config import load_config
    from trainer.data import TripletLoader

    crop, batch_size = (32, 2) if ctx.tiny else (128, 4)
    warmup, steps = RESUME_WARMUP, RESUME_STEPS
    cfg = load_config(DEMO, [f"data.shards={ctx.shards / 'small'}", f"data.crop_size={crop}",
                             f"data.batch_size={batch_size}", "data.backend=webdataset",
                             "model.ngf=16", "model.depth=3", "model.norm=group"])
    loader = TripletLoader(cfg.data, cfg.model.mode, "train", 0, 1, torch.device(ctx.device),
                           seed=0)
    stream = endless(loader)
    batches = [next(stream) for _ in range(warmup + steps)]  # the same data for every run
    del stream, loader
    figures: dict = {"crop": crop, "batch": batch_size, "warmup_steps": warmup,
                     "steps_compared": steps, "ngf": 16, "depth": 3, "norm": "group",
                     "tolerance_max_rel": RESUME_TOLERANCE,
                     "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}
    try:
        for precision in ("bf16", "fp32"):
            with algorithms(False, False, cuda):
                diffs, ema = resume_run(ctx, cfg, precision, batches, warmup, steps,
                                        ema_check=precision == "bf16")
            figures[precision] = {"default": diffs}
            if ema:
                figures["p1_ema_forward"] = ema  # the report's key, kept for its readers
            worst = max(diffs[n]["max_rel"] for n in GATED)
            tol = RESUME_TOLERANCE[precision]
            ctx.check(f"{precision} default: max relative difference <= {tol:g} (G, D, G_ema)",
                      worst <= tol, {n: f"{diffs[n]['max_rel']:.3g}" for n in GATED})
            if not cuda:  # the repo's claim on the CPU
                ctx.check(f"{precision} default: bitwise equal on the CPU",
                          all(diffs[n]["bitwise"] for n in diffs),
                          {n: diffs[n]["max_abs"] for n in diffs})
            # (b) deterministic algorithms: reported, not a pass condition
            det: dict = {}
            try:
                with algorithms(True, False, cuda):
                    det["differences"], _ = resume_run(ctx, cfg, precision, batches, warmup,
                                                       steps)
                det["available"] = True
            except RuntimeError as e:
                if NONDETERMINISTIC not in str(e):
                    raise
                det["available"] = False
                det["raised_by"] = nondeterministic_op(str(e))
                with warnings.catch_warnings(record=True) as records, \
                        algorithms(True, True, cuda):
                    warnings.simplefilter("always")
                    det["warn_only_differences"], _ = resume_run(ctx, cfg, precision, batches,
                                                                 warmup, steps)
                det["ops_without_deterministic_kernel"] = sorted(
                    {nondeterministic_op(str(r.message)) for r in records
                     if NONDETERMINISTIC in str(r.message)})
            figures[precision]["deterministic"] = det
            print(f"{precision}: default {json.dumps(diffs)}\n  deterministic "
                  f"{json.dumps(det)}", flush=True)
    finally:
        AcceleratorState._reset_state(True)
    return figures

