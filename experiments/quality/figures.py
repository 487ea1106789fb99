"""The PNGs of docs/quality/: frame strips (input | each variant | truth), learning curves and
the drift plot, each kept under PNG_BUDGET bytes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from experiments.quality.recipes import KF, LINEART, VARIANTS
from experiments.quality.scores import DRIFT_CLIP, DRIFT_WINDOW

GREY_STRIP = (14, 15, 16)  # three consecutive frames, away from the clip's edges
LINEART_STRIP = (0, 10, 30)
PNG_BUDGET = 300_000  # bytes per PNG in docs/quality/


def save_png(fig, path: Path) -> str:
    """Save a figure as an RGB PNG (matplotlib writes RGBA: a third more bytes) of at most
    PNG_BUDGET bytes: quantized to 256 colours, then scaled down, only as far as needed to
    fit; returns a note saying which."""
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    buf.seek(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(buf) as im:
        rgb = im.convert("RGB")
    rgb.save(path, optimize=True)
    note = ""
    for scale in (1.0, 0.8, 0.64, 0.5):
        if path.stat().st_size <= PNG_BUDGET:
            break
        size = (round(rgb.width * scale), round(rgb.height * scale))
        small = rgb if scale == 1 else rgb.resize(size, Image.Resampling.LANCZOS)
        small.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
        note = " (quantized to 256 colours" + (f", scaled to {scale:.0%}" if scale < 1 else "")
        note += " to stay small)"
    return note


def read_frames(folder: Path, indices) -> list[np.ndarray]:
    from PIL import Image

    return [np.asarray(Image.open(folder / f"frame_{i:06d}.png").convert("RGB"))
            for i in indices]


def strip_columns(data: dict, indices, mode: str) -> list[tuple[str, list[np.ndarray]]]:
    """The input (grey, or line art as training extracts it) and the truth of the strip."""
    import kornia
    import torch

    from inference.video_in import Source
    from models.colour import compose_grey, line_art, normalize_lab

    wanted = set(indices)
    truth = [f.rgb for i, f in enumerate(Source(Path(data["strip"])).read()) if i in wanted]
    if mode == "grey":
        zero = torch.zeros(2, 1, 1)
        return [("grey (input)", [compose_grey(t, zero) for t in truth]), ("truth", truth)]
    x = torch.from_numpy(np.stack(truth)).permute(0, 3, 1, 2).float() / 255
    edges = line_art(normalize_lab(kornia.color.rgb_to_lab(x)), 0.1, 0.2)  # demo's Canny
    art = [np.repeat(((e[0].numpy() + 1) * 127.5).astype(np.uint8)[..., None], 3, axis=2)
           for e in edges]
    return [("line art (input)", art), ("truth", truth)]


def strip_png(names: list[str], data: dict, out: Path, path: Path, indices, mode: str,
              title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (first, inp), (_, truth) = strip_columns(data, indices, mode)
    cols = [(first, inp)]
    for name in names:
        folder = out / "strips" / f"{name}_s0"
        if folder.is_dir():
            cols.append((name, read_frames(folder, indices)))
    cols.append(("truth", truth))
    h, w = truth[0].shape[:2]
    tile = 1.5  # inches per tile's width at 100 dpi: 150 px
    fig, axes = plt.subplots(len(indices), len(cols), squeeze=False,
                             figsize=(tile * len(cols), tile * h / w * len(indices) + 0.5))
    for c, (label, frames) in enumerate(cols):
        for r, frame in enumerate(frames):
            ax = axes[r][c]
            ax.imshow(frame, interpolation="lanczos")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=7)
            if c == 0:
                ax.set_ylabel(f"frame {indices[r]}", fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(pad=0.2)
    note = save_png(fig, path)
    plt.close(fig)
    return note


def learning_curve_png(results: list[dict], path: Path) -> str:
    """Validation gain over grey (psnr_gain) against step, one line per variant (later seeds
    thinner); PSNR where the runs did not log the gain. Returns the key used."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for r in results:
        p = Path(r.get("metrics", ""))
        if "error" in r or not p.is_file():
            continue
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        curves[(r["variant"], r["seed"])] = [x for x in rows if x.get("split") == "val"]
    key = "psnr_gain" if all("psnr_gain" in x for rows in curves.values() for x in rows) \
        else "psnr"
    groups = [("grey mode", [v for v in VARIANTS if v not in LINEART]),
              ("line-art mode", sorted(LINEART))]
    groups = [(t, vs) for t, vs in groups if any(v == k[0] for k in curves for v in vs)]
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 3.6), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, variants) in zip(axes[0], groups):
        for i, v in enumerate(variants):
            for (name, seed), rows in sorted(curves.items()):
                if name != v or not rows:
                    continue
                ax.plot([x["step"] for x in rows], [x[key] for x in rows], marker=".",
                        color=colours[i % len(colours)], lw=1.5 if seed == 0 else 0.7,
                        label=v if seed == 0 else None)
        if key == "psnr_gain":
            ax.axhline(0, color="grey", lw=0.8, ls=":")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("val PSNR gain over grey (dB)" if key == "psnr_gain" else "val PSNR (dB)")
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return key



def drift_png(drifts: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for name, d in drifts.items():
        curve = [np.nan if v is None else v for v in d["curve"]]
        style = dict(color="grey", ls=":", lw=1.2) if name == "grey" else dict(
            lw=1.0, ls="--" if name.endswith(KF) else "-")
        ax.plot(range(len(curve)), curve, label="grey (zero chroma)" if name == "grey" else name,
                **style)
    for x in (DRIFT_WINDOW, len(curve) - DRIFT_WINDOW):
        ax.axvline(x, color="k", lw=0.5, alpha=0.4)
    ax.set_xlabel(f"frame of {DRIFT_CLIP} (held out)")
    ax.set_ylabel("PSNR dB")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
