"""Figures from tricolor-eval's reports: per variant, protocol and clip the table's values
(mean over seeds, with their spread), and drift along the held-out clip."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from experiments.quality.recipes import KF, LINEART

DRIFT_CLIP = "carphone_pristine"  # the held-out clip of >= 90 frames: drift is read on it
DRIFT_WINDOW = 30  # frames: PSNR of the last 30 against the first 30


def video_values(methods: dict) -> dict[str, float]:
    """The table's values of one video: the model's row, its gain over zero chroma, and the
    excesses over the ground truth's own CDC and warp error."""
    nan = float("nan")
    m, grey = ({k: nan if v is None else v for k, v in methods[x].items()}
               for x in ("model", "zero_chroma"))
    return {"psnr": m["psnr"], "gain": m["psnr"] - grey["psnr"], "ssim": m["ssim"],
            "cdc_excess": m["cdc"] - m["cdc_truth"], "warp_excess": m["warp_excess"],
            "colourfulness_diff": m["colourfulness_diff"], "ciede2000": m["ciede2000"]}


def grey_values(methods: dict) -> dict[str, float]:
    return video_values({"model": methods["zero_chroma"], "zero_chroma": methods["zero_chroma"]})


def per_video(report: dict, of=video_values) -> dict[str, dict[str, float]]:
    return {Path(v["path"]).stem: of(v["methods"]) for v in report["videos"]}


def protocol_of(data: dict) -> dict[str, str]:
    """video stem -> protocol name."""
    return {Path(p).stem: proto for proto, paths in data["protocols"].items() for p in paths}


def mean_over(values: list[dict[str, float]]) -> dict[str, float]:
    keys = values[0].keys()
    return {k: float(np.nanmean([v[k] for v in values])) if any(
        not math.isnan(v[k]) for v in values) else float("nan") for k in keys}


# tricolor-eval's baselines under a keyframe protocol (no model): method -> row name
KEYFRAME_BASELINES = {"keyframe_copy": "keyframe copy", "keyframe_flow": "keyframe flow"}


def baseline_row(variant: str, method: str = "keyframe_copy") -> str:
    """The row of one of tricolor-eval's keyframe baselines, one per mode."""
    mode = "line art" if variant in LINEART else "grey"
    return f"{KEYFRAME_BASELINES[method]} ({mode})"


def eval_reports(results: list[dict]) -> Iterator[tuple[dict, str, dict]]:
    """(result, row name, tricolor-eval report) of every scored run: the automatic protocol
    under the variant's name, the keyframe protocol under name + KF, and once per mode the
    keyframe_copy baseline of a keyframe report (as its "model")."""
    copies = set()
    for r in results:
        if "error" in r:
            continue
        yield r, r["variant"], json.loads(Path(r["eval"]).read_text())
        if r.get("eval_keyframes"):
            report = json.loads(Path(r["eval_keyframes"]).read_text())
            yield r, r["variant"] + KF, report
            for method in KEYFRAME_BASELINES:
                row = baseline_row(r["variant"], method)
                if row not in copies and method in report["videos"][0]["methods"]:
                    copies.add(row)
                    yield {**r, "seed": 0}, row, as_model(report, method)


def as_model(report: dict, method: str) -> dict:
    """A copy of a tricolor-eval report with `method`'s scores in the model's place."""
    report = json.loads(json.dumps(report))
    for v in report["videos"]:
        v["methods"]["model"] = v["methods"][method]
        v["psnr_by_frame"]["model"] = v["psnr_by_frame"][method]
    return report


def row_names(names: list[str]) -> list[str]:
    """Table rows: each variant under the automatic protocol, then each under the keyframe
    protocol, and the keyframe-copy baseline of each mode after its last variant."""
    rows = []
    for n in names:
        rows += [n, n + KF]
        if not any(baseline_row(m) == baseline_row(n) for m in names[names.index(n) + 1:]):
            rows += [baseline_row(n, method) for method in KEYFRAME_BASELINES]
    return rows


def summarize(results: list[dict], data: dict) -> dict:
    """variant -> {"seeds": [...], "protocols": {proto: {key: [per-seed value]}},
    "clips": {clip: {key: [per-seed value]}}}, plus "grey" (zero chroma, the same for all)."""
    protos = protocol_of(data)
    out: dict = {}
    for r, variant, report in eval_reports(results):
        clips = per_video(report)
        if "grey" not in out:
            out["grey"] = {"clips": {c: {k: [v] for k, v in vals.items()}
                                     for c, vals in per_video(report, grey_values).items()}}
        row = out.setdefault(variant, {"seeds": [], "protocols": {}, "clips": {}})
        row["seeds"].append(r["seed"])
        for clip, vals in clips.items():
            for k, v in vals.items():
                row["clips"].setdefault(clip, {}).setdefault(k, []).append(v)
        for proto in data["protocols"]:
            vals = mean_over([v for c, v in clips.items() if protos[c] == proto])
            for k, v in vals.items():
                row["protocols"].setdefault(proto, {}).setdefault(k, []).append(v)
    if "grey" in out:
        grey = out["grey"]
        grey["protocols"] = {}
        for proto in data["protocols"]:
            vals = mean_over([{k: v[0] for k, v in grey["clips"][c].items()}
                              for c in grey["clips"] if protos[c] == proto])
            grey["protocols"][proto] = {k: [v] for k, v in vals.items()}
    return out


def cell(values: list[float], scale: float, fmt: str) -> str:
    """The mean, and with several seeds the spread (max - min) in brackets."""
    vals = [v * scale for v in values if not math.isnan(v)]
    if not vals:
        return "–"
    text = fmt.format(float(np.mean(vals)))
    if len(values) > 1:
        text += " (" + fmt.replace("+", "").format(max(vals) - min(vals)) + ")"
    return text



def window_psnr(curve: list) -> float:
    """PSNR of the pooled MSE of frames with a value (frames are the same size)."""
    vals = [v for v in curve if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan")
    return float(-10 * np.log10(np.mean([10 ** (-v / 10) for v in vals])))


def drift(results: list[dict]) -> dict[str, dict[str, list]]:
    """row -> {"first": [...], "last": [...], "change": [...], "curve": [seed 0's]}: PSNR of the
    first and last DRIFT_WINDOW frames of DRIFT_CLIP, per seed; "grey" for zero chroma."""
    out: dict = {}
    for _, row, report in eval_reports(results):
        for v in report["videos"]:
            if Path(v["path"]).stem != DRIFT_CLIP or len(v["psnr_by_frame"]["model"]) < \
                    3 * DRIFT_WINDOW:
                continue
            for name, method in ((row, "model"), ("grey", "zero_chroma")):
                if name == "grey" and "grey" in out:
                    continue
                curve = v["psnr_by_frame"][method]
                first, last = (window_psnr(curve[:DRIFT_WINDOW]),
                               window_psnr(curve[-DRIFT_WINDOW:]))
                d = out.setdefault(name, {"first": [], "last": [], "change": [], "curve": curve})
                d["first"].append(first), d["last"].append(last), d["change"].append(last - first)
    return out

