"""tricolor-eval: the report (per video, overall, baselines, floors), the per-frame ablation,
and bad inputs; with tiny random models on small synthetic videos."""

from __future__ import annotations

import json
import math
from pathlib import Path

import kornia
import numpy as np
import pytest
import torch
from test_colorize import decode, tiny_export, write_clip
from videos import scene_video, size_change_video, textured_frames

from inference.evaluate import METHODS, main

FLOORS = ("cdc_truth", "warp_truth", "colourfulness_truth")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> list[Path]:
    tmp = tmp_path_factory.mktemp("videos")
    moving = write_clip(tmp / "moving.mp4", textured_frames(14, 64, 48, seed=5,
                                                            tint=(1.0, 0.7, 0.4)))
    cut = scene_video(tmp / "cut.mp4", [6, 6], width=64, height=48)
    return [moving, cut]


def run(*args) -> int:
    return main([str(a) for a in args])


def zero_chroma_psnr(path: Path, n: int) -> float:
    """Independent reference: PSNR of the greyscale of the video (its L, a = b = 0, through
    kornia's Lab) against the video itself, over the first n frames."""
    frames = torch.from_numpy(np.stack(decode(path)[:n])).permute(0, 3, 1, 2).float() / 255
    lab = kornia.color.rgb_to_lab(frames)
    grey = kornia.color.lab_to_rgb(torch.cat([lab[:, :1], torch.zeros_like(lab[:, 1:])], 1))
    grey = (grey * 255).round() / 255
    return (10 * torch.log10(1 / (grey - frames).square().mean())).item()


def test_report_per_video_and_overall(tmp_path, grey_export, videos, capsys):
    out = tmp_path / "report.json"
    assert run("--model", grey_export, "--videos", *videos, "--json", out, "--max-frames", 10,
               "--size", 32) == 0
    table = capsys.readouterr().out
    for word in ("moving.mp4", "cut.mp4", "overall (2 videos)", *METHODS, "PSNR", "dE00"):
        assert word in table
    report = json.loads(out.read_text())
    assert report["mode"] == "grey" and "CIEDE2000" in report["conventions"]
    assert [v["frames"] for v in report["videos"]] == [10, 10]
    assert [v["scenes"] for v in report["videos"]] == [1, 2]
    for v in report["videos"]:
        assert v["size"] == [64, 48] and v["working_size"] == [44, 32]
        methods = v["methods"]
        assert set(methods) == set(METHODS)
        for floor in FLOORS:  # the ground truth's own values: the same for every method
            assert len({m[floor] for m in methods.values()}) == 1
        for m in methods.values():
            assert m["warp_excess"] == pytest.approx(m["warp"] - m["warp_truth"])
            assert m["colourfulness_diff"] == pytest.approx(
                abs(m["colourfulness"] - m["colourfulness_truth"]))
            assert all(math.isfinite(x) for x in m.values())
        # The greyscale baseline is exactly the video's own L with zero chroma.
        assert methods["zero_chroma"]["psnr"] == pytest.approx(
            zero_chroma_psnr(Path(v["path"]), 10), abs=0.05)
        assert methods["zero_chroma"]["colourfulness"] < 1.0
        for curve in v["psnr_by_frame"].values():  # one PSNR per frame: the drift curve
            assert len(curve) == 10 and all(math.isfinite(x) for x in curve)
    for method in METHODS:
        for key, value in report["overall"][method].items():
            per_video = [v["methods"][method][key] for v in report["videos"]]
            assert value == pytest.approx(np.mean(per_video)), (method, key)


def test_per_frame_ablation(tmp_path, grey_export, videos):
    """Without motion the temporal input is the centre frame anyway: model = per-frame; with
    motion (and a random model, which uses its neighbours) they differ."""
    static = write_clip(tmp_path / "static.mp4", textured_frames(1, 64, 48, seed=6) * 6,
                        audio=False)
    out = tmp_path / "r.json"
    assert run("--model", grey_export, "--videos", static, videos[0], "--json", out,
               "--size", 32) == 0
    still, moving = (v["methods"] for v in json.loads(out.read_text())["videos"])
    # (The encoded static frames differ by codec noise only: near-equal, not bitwise.)
    assert still["model"]["psnr"] == pytest.approx(still["per_frame"]["psnr"], abs=0.05)
    assert moving["model"]["psnr"] != pytest.approx(moving["per_frame"]["psnr"], abs=1e-3)


def test_lineart_model(tmp_path, videos):
    export = tiny_export(tmp_path / "la", mode="lineart")
    out = tmp_path / "r.json"
    assert run("--model", export, "--videos", videos[1], "--json", out, "--size", 32) == 0
    report = json.loads(out.read_text())
    assert report["mode"] == "lineart" and report["videos"][0]["frames"] == 12


def test_bad_inputs(tmp_path, grey_export, videos, capsys):
    garbage = tmp_path / "bad.mp4"
    garbage.write_bytes(b"\0" * 1000)
    assert run("--model", grey_export, "--videos", videos[0], garbage) == 1
    assert str(garbage) in capsys.readouterr().err
    assert run("--model", grey_export, "--videos", tmp_path / "none.mp4") == 1
    assert "none.mp4" in capsys.readouterr().err
    assert run("--model", tmp_path, "--videos", videos[0]) == 1
    assert str(tmp_path) in capsys.readouterr().err
    nowhere = tmp_path / "no" / "dir" / "r.json"
    assert run("--model", grey_export, "--videos", videos[0], "--json", nowhere) == 1
    assert str(nowhere) in capsys.readouterr().err


def test_a_json_that_cannot_be_written_fails_before_any_scoring(tmp_path, grey_export,
                                                                 videos, capsys):
    for target, says in ((tmp_path, "is a folder"), (videos[0], "is one of the videos")):
        before = videos[0].read_bytes()
        assert run("--model", grey_export, "--videos", *videos, "--json", target) == 1
        captured = capsys.readouterr()
        assert str(target) in captured.err and says in captured.err
        assert "model:" not in captured.err and captured.out == ""  # nothing was scored
        assert videos[0].read_bytes() == before


def test_a_failing_video_is_named_and_the_others_are_kept(tmp_path, grey_export, videos,
                                                          capsys):
    """A video that breaks midway (its frame size changes at frame 5) is reported by name;
    the videos before and after it are scored, printed and written; exit status 1."""
    broken = size_change_video(tmp_path / "change.ts", [(5, 64, 48), (5, 96, 64)])
    out = tmp_path / "r.json"
    assert run("--model", grey_export, "--videos", videos[0], broken, videos[1], "--json", out,
               "--max-frames", 8, "--size", 32) == 1
    captured = capsys.readouterr()
    assert f"{broken}: frame 5 is 96x64" in captured.err
    assert f"FAILED {broken}" in captured.out and "overall (2 videos)" in captured.out
    report = json.loads(out.read_text())
    assert [v["path"] for v in report["videos"]] == [str(videos[0]), str(videos[1])]
    assert [f["path"] for f in report["failures"]] == [str(broken)]
    assert "frame 5" in report["failures"][0]["error"]
    assert report["overall"]["model"]["psnr"] == pytest.approx(
        np.mean([v["methods"]["model"]["psnr"] for v in report["videos"]]))


def test_a_greyscale_video_is_marked_and_left_out_of_overall(tmp_path, grey_export, videos,
                                                             capsys):
    frames = textured_frames(8, 64, 48, seed=11)
    grey = write_clip(tmp_path / "grey.mp4", [np.repeat(f.mean(axis=-1, keepdims=True), 3, -1)
                                              .astype(np.uint8) for f in frames], audio=False)
    out = tmp_path / "r.json"
    assert run("--model", grey_export, "--videos", grey, videos[0], "--json", out,
               "--max-frames", 8, "--size", 32) == 0
    captured = capsys.readouterr()
    assert "warning" in captured.err and f"{grey}: greyscale video" in captured.err
    assert "GREYSCALE" in captured.out and "overall (1 video)" in captured.out
    report = json.loads(out.read_text())
    grey_v, colour_v = report["videos"]
    assert (grey_v["greyscale"], colour_v["greyscale"]) == (True, False)
    # The zero-chroma "baseline" of a greyscale truth is the truth itself: blank, not 100 dB.
    assert all(x is None for x in grey_v["methods"]["zero_chroma"].values())
    assert math.isfinite(grey_v["methods"]["model"]["psnr"])
    assert colour_v["methods"]["zero_chroma"]["psnr"] < 100
    for method in METHODS:  # overall: the colour video alone
        assert report["overall"][method] == pytest.approx(colour_v["methods"][method])


def test_a_bad_keyframes_protocol_fails_before_the_model_or_videos_are_opened(
        tmp_path, grey_export, videos, capsys):
    """A mistyped protocol is the one error reported, at once: not the missing video's nor
    the damaged model's (it was loaded first); nothing is written."""
    damaged = tmp_path / "export"
    damaged.mkdir()
    (damaged / "generator.json").write_bytes((grey_export / "generator.json").read_bytes())
    (damaged / "generator.safetensors").write_bytes(b"not weights" * 10)
    out = tmp_path / "r.json"
    assert run("--model", damaged, "--videos", tmp_path / "missing.mp4", "--json", out,
               "--keyframes", "every:1") == 1
    captured = capsys.readouterr()
    assert captured.err == ("tricolor-eval: error: --keyframes 'every:1': expected none, first "
                            "or every:N with N >= 2\n")
    assert captured.out == "" and not out.exists()
    # with a good protocol and a real video, the model's error: loading it fails
    assert run("--model", damaged, "--videos", videos[0], "--keyframes", "first") == 1
    assert "generator.safetensors cannot be loaded" in capsys.readouterr().err


def test_evaluate_needs_the_model_and_colorizer_modules_not_the_colorize_cli():
    import subprocess
    import sys

    code = ("import sys, inference.evaluate; "
            "sys.exit('inference.colorize' in sys.modules)")
    root = Path(__file__).parents[1]
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0
