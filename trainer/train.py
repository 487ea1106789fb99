"""The training loop, top to bottom: build, then for each batch one GAN step, with logging,
images and validation at their intervals, and the export of the EMA generator at the end."""

from __future__ import annotations

import logging
import math
import subprocess
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm import tqdm

from metrics import ColorizationMetrics
from models import build_discriminator, build_generator, build_loss
from models.export import export_generator
from shards.atomic import write_text_atomic
from shards.manifest import ManifestError
from trainer.backends import make_backend
from trainer.checkpoint import Checkpointer
from trainer.data import NoSamplesError, TripletLoader, select_samples_once
from trainer.ema import EMA
from trainer.run_log import RunLog, Window
from trainer.sn_sync import broadcast_spectral_norm, spectral_norm_sigmas
from trainer.step import GAN, train_step
from trainer.stop import StopRequest, stop_file_from_env
from trainer.sync_batchnorm import convert_sync_batchnorm
from trainer.validate import colorize_triplet, image_grid, validate

log = logging.getLogger(__name__)


def lr_lambda(cfg, total_steps: int):
    """Multiplier of the base learning rate after `step` optimizer steps (a step per
    train.grad_accum batches): warm-up, then the decay over `total_steps` optimizer steps."""
    warmup, decay = cfg.optim.warmup_steps, cfg.optim.decay

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        if decay == "linear":
            return max(0.0, 1.0 - progress)
        if decay == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def build_gan(cfg, accelerator: Accelerator) -> GAN:
    """G, D and their optimizers, prepared by the backend of this launch (DDP or DeepSpeed)."""
    backend = make_backend(accelerator)
    G, D = build_generator(cfg.model), build_discriminator(cfg.model)
    if cfg.train.channels_last:  # before the optimizers and the EMA copy see the parameters
        G, D = (m.to(memory_format=torch.channels_last) for m in (G, D))
    if cfg.model.norm.value == "batch" and accelerator.num_processes > 1:
        # statistics over all ranks' batches, CPU or GPU: one all_reduce per layer, no host
        # sync (torch's SyncBatchNorm syncs the host once per layer and refuses CPU tensors)
        G = convert_sync_batchnorm(G)
    betas = (cfg.optim.beta1, cfg.optim.beta2)
    # DDP: fused Adam, which takes the skip decision as a device tensor (trainer/backends/ddp.py)
    opt_G = backend.adam(G.parameters(), lr=cfg.optim.lr_g, betas=betas)
    opt_D = backend.adam(D.parameters(), lr=cfg.optim.lr_d, betas=betas)
    G, D, opt_G, opt_D = backend.prepare(G, D, opt_G, opt_D)
    broadcast_spectral_norm(backend.unwrap(D))  # ranks start with rank 0's u, v
    ema = EMA(backend.unwrap(G), cfg.train.ema_decay)
    ema.model.float()  # fp32 even when G's weights are not (DeepSpeed fp16)
    return GAN(
        G, D, opt_G, opt_D,
        loss=build_loss(cfg.loss),
        ema=ema,
        model_cfg=cfg.model,
        backend=backend,
        grad_clip=cfg.optim.grad_clip,
        d_steps_per_g=cfg.optim.d_steps_per_g,
    )


def make_loader(cfg, accelerator: Accelerator, mode: str, split: str) -> TripletLoader:
    # the stored flow is read only for what uses it: the temporal loss in training, the warp
    # error in validation (when the shards have it; else Farnebäck on the CPU)
    flow = cfg.loss.lambda_temporal > 0 if split == "train" else None
    # one reader per job: the main process parses good-samples.json (or scans the shards) and
    # every rank gets its list; its data errors are raised on every rank
    samples = select_samples_once(cfg.data, split, accelerator)
    if flow and not samples.flow:  # the same on every rank: the samples are rank 0's
        raise ManifestError(f"loss.lambda_temporal = {cfg.loss.lambda_temporal}: "
                            f"{cfg.data.shards}/manifest.json records no optical flow: rebuild "
                            "the shards with `tricolor-shards build --flow`, or set "
                            "loss.lambda_temporal=0")
    return TripletLoader(cfg.data, mode, split, accelerator.process_index,
                         accelerator.num_processes, accelerator.device, cfg.train.seed,
                         shuffle=split == "train", augment=split == "train", flow=flow,
                         samples=samples)


def make_val_loader(cfg, accelerator: Accelerator, mode: str) -> TripletLoader | None:
    """The val loader, or None (validation off) when the scan of the val split finds no full
    batch per rank: decided from what the scan found, not from the manifest's count."""
    try:
        return make_loader(cfg, accelerator, mode, "val")
    except NoSamplesError as e:
        if accelerator.is_main_process:
            log.warning("validation is off: %s", e)
        return None


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def start_run(cfg, accelerator: Accelerator, run_dir: Path, fresh: bool) -> None:
    """The launch is accepted (data scanned, checkpoint loaded or none): only now does the run
    directory change. `fresh` (--no-resume) moves old checkpoints aside; COMPLETE goes (the
    run trains again); config.yaml is replaced by this launch's (whole or not at all)."""
    from omegaconf import OmegaConf

    if accelerator.is_main_process:
        old = run_dir / "checkpoints"
        if fresh and old.exists():
            aside = run_dir / f"checkpoints.before-{int(time.time())}"
            old.rename(aside)
            log.warning("--no-resume: moved %s to %s", old, aside)
        (run_dir / "COMPLETE").unlink(missing_ok=True)
        write_text_atomic(run_dir / "config.yaml",
                          f"# git commit {git_commit()}\n" + OmegaConf.to_yaml(cfg))
    accelerator.wait_for_everyone()


def resume(cfg, accelerator, gan, loader, schedulers, checkpointer, explicit):
    """Restore everything saved at a step boundary; returns the progress counters."""
    restored = checkpointer.restore(gan, cfg.model, explicit)
    if restored is None:
        return {"step": 0, "samples_seen": 0, "skipped_total": 0}
    path, (state, position, tensors) = restored
    # Accumulation windows stay where the uninterrupted run has them (every grad_accum batches
    # from step 0), and with them the optimizer and schedule steps. A checkpoint inside a
    # window (a stop or checkpoint_every not a multiple of grad_accum) does not hold the
    # gradients accumulated so far: that window's update has only its remaining batches.
    accelerator.step = state["step"] % cfg.train.grad_accum
    for scheduler, key in zip(schedulers, ("sched_G", "sched_D")):
        scheduler.load_state_dict(state[key])
    gan.backend.load_trainer_state(state)
    loader.load_state_dict(position)
    if tensors is not None:  # same world size: this rank's RNG continues where it stopped
        torch.set_rng_state(tensors["rng_cpu"])
        if "rng_cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng_cuda"])
    broadcast_spectral_norm(gan.backend.unwrap(gan.D))
    if accelerator.is_main_process:
        print(f"resumed from {path} at step {state['step']}", flush=True)
    log.info("resumed from %s at step %d", path, state["step"])
    return state


def save_checkpoint(cfg, accelerator, checkpointer, gan, loader, schedulers, progress):
    from omegaconf import OmegaConf

    state = {
        **progress,
        "sched_G": schedulers[0].state_dict(),
        "sched_D": schedulers[1].state_dict(),
        **gan.backend.trainer_state(),  # the fp16 scaler of the DDP path
        "model": OmegaConf.to_container(OmegaConf.structured(cfg.model), enum_to_str=True),
    }
    return checkpointer.save(progress["step"], gan, state, loader.state_dict())


def check_nonfinite(longest: int, limit: int, step: int) -> None:
    """`longest`: the longest run of consecutive skipped steps, counted on the device and read
    at log, checkpoint and stop steps only, so the run stops at most log_every steps after
    the limit was reached (no host sync per step)."""
    if longest >= limit:
        raise FloatingPointError(
            f"{longest} steps in a row had a non-finite loss (step {step}); "
            "stopping instead of training on garbage: lower the learning rate, "
            "use bf16 instead of fp16, or set optim.grad_clip"
        )


def train(
    cfg, accelerator: Accelerator, run_dir: Path, resume_from: Path | None = None,
    allow_resume: bool = True,
) -> dict[str, float] | None:
    """Train to `total_steps`; returns the last validation metrics, or None when a stop was
    requested (a checkpoint was saved; the caller exits 0 without marking the run complete).
    Nothing in `run_dir` changes before the data is scanned and the checkpoint (if any) is
    loaded: a refused launch (CheckpointError, NoSamplesError, ManifestError) leaves the run as
    it was."""
    mode = cfg.model.mode.value
    gan = build_gan(cfg, accelerator)
    loader = make_loader(cfg, accelerator, mode, "train")
    val_loader = make_val_loader(cfg, accelerator, mode)
    metrics = ColorizationMetrics().to(accelerator.device)
    total_steps = cfg.train.max_steps or cfg.train.epochs * len(loader)  # in batches
    # not prepared: they step once per optimizer step, i.e. every grad_accum batches
    optimizer_steps = max(1, total_steps // cfg.train.grad_accum)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, optimizer_steps))
                  for opt in (gan.opt_G, gan.opt_D)]
    global_batch = cfg.data.batch_size * accelerator.num_processes
    log.info("training %d steps, %d triplets per step over %d processes",
             total_steps, global_batch, accelerator.num_processes)

    checkpointer = Checkpointer(run_dir, cfg.train.keep_checkpoints)
    progress = {"step": 0, "samples_seen": 0, "skipped_total": 0}
    if allow_resume:
        state = resume(cfg, accelerator, gan, loader, schedulers, checkpointer, resume_from)
        progress = {k: state[k] for k in progress}
    start_run(cfg, accelerator, run_dir, fresh=not allow_resume)
    run_log = RunLog(run_dir, accelerator.is_main_process)
    step, samples_seen, skipped_total = (progress[k] for k in progress)
    stop = StopRequest(stop_file_from_env())
    stopped = False
    window = Window(accelerator.device)  # the steps' scalars, on the device until a log step
    wait = compute = 0.0
    final: dict[str, float] = {}
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step",
               disable=not accelerator.is_main_process)
    try:
        while step < total_steps:
            batches = iter(loader)
            while step < total_steps:
                t0 = time.perf_counter()
                batch = next(batches, None)
                if batch is None:
                    break  # end of the epoch
                t1 = time.perf_counter()
                out = train_step(accelerator, gan, batch, step)
                if accelerator.sync_gradients:  # the optimizers stepped (end of a window)
                    for scheduler in schedulers:
                        scheduler.step()
                # On a GPU the step is only queued here: `compute` also gets the time the
                # queue takes to drain at the next host sync (the log, the stop agreement).
                t2 = time.perf_counter()
                wait, compute = wait + (t1 - t0), compute + (t2 - t1)
                step += 1
                samples_seen += global_batch
                window.add(out, accelerator.sync_gradients)  # no host sync on ordinary steps
                bar.update(1)

                last = step == total_steps
                every = cfg.train.checkpoint_every
                save_due = last or bool(every and step % every == 0)
                logged = step % cfg.train.log_every == 0 or last
                if logged:  # the one host sync of a log step: one stacked all_reduce
                    steps = window.steps
                    sigmas = spectral_norm_sigmas(gan.backend.unwrap(gan.D))
                    scalars, skipped, longest = window.reduce(
                        accelerator, {f"SpectralNorm/sigma/{n}": s for n, s in sigmas.items()})
                    compute += time.perf_counter() - t2
                    skipped_total += skipped
                    check_nonfinite(longest, cfg.train.max_nonfinite, step)
                    scalars |= {
                        "Progress/samples_seen": samples_seen,
                        "Progress/epoch": loader.epoch,
                        "Skipped/total": skipped_total,
                        "Data/skipped_samples": loader.skipped_total,
                        "Timing/data_wait_fraction": wait / max(wait + compute, 1e-9),
                        "Timing/triplets_per_s": global_batch * steps / max(wait + compute, 1e-9),
                        "LR/G": schedulers[0].get_last_lr()[0],
                        "LR/D": schedulers[1].get_last_lr()[0],
                    }
                    run_log.scalars(scalars, step)
                    bar.set_postfix(D=f"{scalars['Loss/D/total']:.3f}",
                                    G=f"{scalars['Loss/G/total']:.3f}",
                                    tps=f"{scalars['Timing/triplets_per_s']:.1f}")
                    wait, compute = 0.0, 0.0

                if cfg.train.image_every and (step % cfg.train.image_every == 0 or last):
                    if accelerator.is_main_process:  # G_ema only: D's u, v are not touched
                        with torch.no_grad():
                            pred = colorize_triplet(gan.ema.model, batch.cond, mode)
                        run_log.images("Images/train", image_grid(batch, pred, mode), step)
                if val_loader is not None and (
                    (cfg.train.val_every and step % cfg.train.val_every == 0) or last
                ):
                    final, first = validate(gan.ema.model, val_loader, metrics, mode)
                    run_log.evaluation(final, step)
                    if first is not None:
                        run_log.images("Images/val", image_grid(first[0], first[1], mode), step)
                    log.info("step %d validation: %s", step, format_metrics(final))

                # Agreeing on a stop is a host sync (and a stat of the stop file): every
                # stop_check_every steps, and always where a checkpoint is due anyway.
                if save_due or step % cfg.train.stop_check_every == 0:
                    t3 = time.perf_counter()
                    stopped = stop.agreed(accelerator.device)
                    compute += time.perf_counter() - t3
                if stopped or save_due:
                    if not logged:  # skipped_total is saved: exact, from the device counter
                        skipped, longest = window.skips()
                        skipped_total += skipped
                        check_nonfinite(longest, cfg.train.max_nonfinite, step)
                    progress = {"step": step, "samples_seen": samples_seen,
                                "skipped_total": skipped_total}
                    save_checkpoint(cfg, accelerator, checkpointer, gan, loader, schedulers,
                                    progress)
                if stopped:
                    log.warning("stopped on request at step %d; rerun the same command to "
                                "resume", step)
                    return None
    finally:
        stop.close()
        bar.close()
        run_log.close()
    if accelerator.is_main_process:
        export_generator(gan.ema.model, cfg.model, run_dir / "export", step)
    accelerator.wait_for_everyone()
    return final


def format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
