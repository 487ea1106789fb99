"""tricolor-colorize: the plumbing (frames, fps, size, audio, luminance, memory, errors) and
the temporal handling (windows, recurrence, resets at scene cuts), with tiny random models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from fractions import Fraction
from pathlib import Path

import av
import cv2
import kornia
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from videos import rotated_video, scene_video, size_change_video, textured_frames

from inference.batch import BatchError, batch_plan, batch_task, output_complete
from inference.colorize import main
from inference.colorizer import Colorizer, prepare
from inference.model import Model, ModelError, load_model, resolve_size
from inference.video_in import Source
from inference.video_out import FRAMES_MARKER, HOST, temp_name
from models import build_generator
from models.colour import compose_grey
from models.config import ModelConfig
from models.export import export_generator
from models.memory import memory_of
from shards.cli import main as shards_main
from shards.video import VideoError, decode_frames

ROOT = Path(__file__).resolve().parents[1]
LUMINANCE = torch.tensor([0.212671, 0.715160, 0.072169]).view(3, 1, 1)


# --- helpers shared with test_evaluate.py ---------------------------------------------------

def write_clip(path: Path, frames: list[np.ndarray], fps: int = 25, audio: bool = True,
               pix_fmt: str = "yuv420p", faststart: bool = False) -> Path:
    """H.264 video of `frames`, with a mono AAC sine tone of the same duration if `audio`."""
    h, w = frames[0].shape[:2]
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as c:
        video = c.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = w, h, pix_fmt
        video.options = {"crf": "10", "preset": "ultrafast"}
        if audio:
            sound = c.add_stream("aac", rate=44100)
            sound.layout = "mono"
        start = 0
        for rgb in frames:
            for packet in video.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                c.mux(packet)
            if audio:
                n = 44100 // fps
                tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(start, start + n) / 44100)
                frame = av.AudioFrame.from_ndarray(tone.astype(np.float32)[None], format="fltp",
                                                   layout="mono")
                frame.sample_rate, frame.pts = 44100, start
                start += n
                for packet in sound.encode(frame):
                    c.mux(packet)
        for packet in video.encode():
            c.mux(packet)
        if audio:
            for packet in sound.encode():
                c.mux(packet)
    return path


def tiny_export(out: Path, mode: str = "grey", seed: int = 0, memory: bool = False) -> Path:
    """A randomly initialised generator, exported as training exports it."""
    torch.manual_seed(seed)
    cfg = ModelConfig(mode=mode, ngf=4, depth=2, norm="group", zero_init_head=False,
                      memory=memory)
    export_generator(build_generator(cfg), cfg, out, step=1)
    return out


def decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def luminance(frames) -> torch.Tensor:
    """CIE Y (relative luminance, linear light, D65) of sRGB uint8 frames [T, H, W]."""
    rgb = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255
    return (kornia.color.rgb_to_linear_rgb(rgb) * LUMINANCE).sum(dim=1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return (10 * torch.log10(1 / (a - b).square().mean())).item()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """24 frames of 96x64 at 25 fps, yuv420p, with AAC audio."""
    frames = textured_frames(24, 96, 64, seed=1, tint=(1.0, 0.8, 0.5))
    return write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", frames)


def run(*args) -> int:
    return main([str(a) for a in args])


# --- the output matches the input -----------------------------------------------------------

def test_video_out_matches_input_frames_fps_size_audio(tmp_path, grey_export, clip):
    out = tmp_path / "out.mp4"
    assert run("--model", grey_export, "--input", clip, "--output", out, "--size", 32) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]  # no temporary left
    with av.open(str(clip)) as a, av.open(str(out)) as b:
        va, vb = a.streams.video[0], b.streams.video[0]
        assert vb.average_rate == va.average_rate == Fraction(25)
        assert (vb.codec_context.width, vb.codec_context.height) == (96, 64)
        assert vb.codec_context.format.name == "yuv420p"
        pts_a = [f.pts * f.time_base for f in a.decode(va)]
        pts_b = [f.pts * f.time_base for f in b.decode(vb)]
        assert len(pts_b) == len(pts_a) == 24
        assert pts_b == pts_a  # the same timestamps, so the same sync with the audio
    with av.open(str(clip)) as a, av.open(str(out)) as b:
        sa, sb = a.streams.audio[0], b.streams.audio[0]
        assert (sb.codec_context.name, sb.sample_rate) == ("aac", sa.sample_rate)
        packets_a = [bytes(p) for p in a.demux(sa) if p.size]
        packets_b = [bytes(p) for p in b.demux(sb) if p.size]
        assert packets_b == packets_a  # copied, not re-encoded


def test_luminance_is_kept(tmp_path, grey_export):
    """The output's luminance (CIE Y) equals the input's, in PNG frames and in a lossless
    4:4:4 video (--crf 0); the chroma is the model's, far from grey. (A lossy --crf adds
    the codec's error on top: this random model's noisy chroma is a hard case for it.)"""
    frames = textured_frames(12, 96, 64, seed=2, tint=(0.9, 0.9, 0.6))
    src = write_clip(tmp_path / "in444.mp4", frames, audio=False, pix_fmt="yuv444p")
    truth = luminance(decode(src))
    run("--model", grey_export, "--input", src, "--output", tmp_path / "png", "--size", 32)
    pngs = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "png").glob("*.png"))]
    assert len(pngs) == 12
    assert psnr(luminance(pngs), truth) > 45
    assert np.abs(np.diff(np.stack(pngs).astype(int), axis=-1)).mean() > 5  # coloured
    run("--model", grey_export, "--input", src, "--output", tmp_path / "out.mkv", "--size", 32,
        "--crf", 0)
    out = decode(tmp_path / "out.mkv")
    assert len(out) == 12
    assert psnr(luminance(out), truth) > 45


def test_compose_grey_is_kornias_lab_in_gamut():
    g = torch.Generator().manual_seed(0)
    rgb = (torch.rand(3, 16, 20, generator=g) * 0.5 + 0.25)  # mid-tones: small ab fit
    rgb8 = (rgb * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    ab = (torch.rand(2, 4, 5, generator=g) - 0.5) * 0.1  # +-5.5 a,b units, in gamut
    x = torch.from_numpy(rgb8).permute(2, 0, 1).float() / 255
    up = torch.nn.functional.interpolate(ab[None], (16, 20), mode="bilinear",
                                         align_corners=False, antialias=True)[0] * 110
    lab = torch.cat([kornia.color.rgb_to_lab(x)[:1], up])
    expected = (kornia.color.lab_to_rgb(lab) * 255).round().permute(1, 2, 0).numpy()
    got = compose_grey(rgb8, ab)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    grey = compose_grey(rgb8, torch.zeros(2, 1, 1)).astype(int)
    assert np.abs(grey - grey[..., :1]).max() <= 1  # zero chroma: R = G = B


# --- temporal handling ----------------------------------------------------------------------

class RecordingGrey(nn.Module):
    """Stands in for GreyUNet: records every window, predicts zero chroma."""

    def __init__(self):
        super().__init__()
        self.windows, self.temporal = [], True

    def forward(self, cond):
        self.windows += list(cond)
        return torch.zeros(cond.shape[0], 2, *cond.shape[-2:])


class RecordingLineart(nn.Module):
    """Stands in for LineartUNet: records every previous-colour input, returns a new Lab."""

    def __init__(self):
        super().__init__()
        self.prevs, self.outs, self.temporal = [], [], True

    def forward(self, lineart, prev):
        self.prevs.append(prev.clone())
        out = torch.full_like(prev[:, :3], 0.1 * len(self.outs) - 0.5)  # Lab
        self.outs.append(out)
        return out


def stub(G: nn.Module, mode: str, memory: bool | None = None) -> Model:
    memory = mode == "lineart" if memory is None else memory
    return Model(G, mode, 2, Path("stub"), 0, None, "stub", (0.1, 0.2), memory)


@pytest.fixture(scope="module")
def two_scenes(tmp_path_factory) -> Path:
    return scene_video(tmp_path_factory.mktemp("scenes") / "cut.mp4", [4, 5])


def test_grey_windows_are_padded_at_the_ends_and_at_scene_cuts(two_scenes):
    source, G = Source(two_scenes), RecordingGrey()
    model = stub(G, "grey")
    items = list(Colorizer(model, batch_size=3)(
        prepare(source.read(), (64, 48), model, torch.device("cpu"), 25.0), "out"))
    scenes = [it.scene for it in items]
    assert scenes == [0] * 4 + [1] * 5  # the detector of tricolor-shards finds the cut
    assert [it.index for it in items] == list(range(9))  # in order, all of them
    conds = [it.cond for it in items]
    for t, window in enumerate(G.windows):
        prev = t - 1 if t > 0 and scenes[t - 1] == scenes[t] else t
        nxt = t + 1 if t < 8 and scenes[t + 1] == scenes[t] else t
        expected = torch.stack([conds[prev], conds[t], conds[nxt]])
        assert torch.equal(window, expected), t
    assert len(G.windows) == 9


def test_cuts_are_found_in_greyscale_input(tmp_path):
    """A greyscale video has no hue or saturation change at a cut, only luma: the detector's
    threshold is divided by 3 for it (at the full threshold this cut would be missed)."""
    frames = (textured_frames(4, 64, 48, seed=100, tint=(1, 0.5, 0.3))
              + textured_frames(5, 64, 48, seed=101, tint=(0.3, 0.6, 1)))
    grey = [np.repeat(f.mean(axis=-1, keepdims=True), 3, -1).astype(np.uint8) for f in frames]
    source = Source(write_clip(tmp_path / "grey.mp4", grey, audio=False))
    model = stub(RecordingGrey(), "grey")
    items = list(prepare(source.read(), (64, 48), model, torch.device("cpu"), 25.0))
    assert [it.scene for it in items] == [0] * 4 + [1] * 5


def test_lineart_recurrence_restarts_without_memory_at_scene_cuts(two_scenes):
    source, G = Source(two_scenes), RecordingLineart()
    model = stub(G, "lineart")
    items = list(Colorizer(model)(
        prepare(source.read(), (64, 48), model, torch.device("cpu"), 25.0), "out"))
    assert len(items) == 9
    for t, prev in enumerate(G.prevs):
        if t in (0, 4):  # a scene's first frame: no memory
            assert torch.equal(prev, torch.zeros_like(prev)), t
        else:
            assert torch.equal(prev, memory_of(G.outs[t - 1], items[t - 1].cond[None])), t
    # The line art is the training transform's: black lines (-1) on white (+1).
    assert set(torch.unique(items[0].cond).tolist()) <= {-1.0, 1.0}


def test_the_run_config_sets_working_size_and_canny(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    tiny_export(run_dir / "export", mode="lineart")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text(json.dumps({"params": {"short_side": 48}}))
    (run_dir / "config.yaml").write_text(
        f"# git commit x\ndata:\n  shards: {tmp_path / 'shards'}\n  canny_low: 0.3\n"
        "  canny_high: 0.4\n")
    model = load_model(run_dir, torch.device("cpu"))  # a run folder: its export/
    assert (model.short_side, model.canny, model.mode) == (48, (0.3, 0.4), "lineart")
    size, why = resolve_size(model, 320, 180, None)
    assert size == (84, 48) and "manifest.json" in why  # 85.3 -> a multiple of 4
    assert resolve_size(model, 320, 180, 64)[0] == (112, 64)


# --- other inputs and outputs ---------------------------------------------------------------

def test_frames_folder_in_side_by_side_video_out(tmp_path, grey_export):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, rgb in enumerate(textured_frames(6, 48, 32, seed=3)):
        Image.fromarray(rgb).save(folder / f"f{i}.png")  # f10 would sort after f9
    out = tmp_path / "sbs.mp4"
    assert run("--model", grey_export, "--input", folder, "--output", out, "--fps", 10,
               "--side-by-side", "--size", 32) == 0
    frames = decode(out)
    assert len(frames) == 6 and frames[0].shape == (32, 96, 3)
    with av.open(str(out)) as c:
        assert c.streams.video[0].average_rate == 10 and not c.streams.audio
    left = frames[0][:, :48].astype(int)
    assert np.abs(left - left[..., :1]).max() <= 3  # the greyscale input (after 4:2:0)


def test_lineart_model(tmp_path, clip, grey_export):
    export = tiny_export(tmp_path / "la", mode="lineart")
    assert run("--model", export, "--input", clip, "--output", tmp_path / "la.mp4",
               "--size", 32) == 0
    assert len(decode(tmp_path / "la.mp4")) == 24
    assert run("--model", export, "--input", clip, "--output", tmp_path / "la2",
               "--size", 32, "--lineart") == 0
    assert len(list((tmp_path / "la2").glob("*.png"))) == 24


# --- bad inputs -----------------------------------------------------------------------------

def test_bad_input_model_and_output(tmp_path, grey_export, clip, capsys):
    out = tmp_path / "out.mp4"

    def fails(*args, names):
        assert run(*args) == 1
        err = capsys.readouterr().err
        assert "error" in err and str(names) in err, err
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if "partial" in p.name]

    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video at all" * 100)
    fails("--model", grey_export, "--input", garbage, "--output", out, names=garbage)
    missing = tmp_path / "missing.mp4"
    fails("--model", grey_export, "--input", missing, "--output", out, names=missing)
    fails("--model", tmp_path, "--input", clip, "--output", out, names=tmp_path)
    fails("--model", grey_export, "--input", clip, "--output", out, "--lineart",
          names=grey_export)
    # An export whose settings do not match its weights.
    wrong = tmp_path / "wrong"
    tiny_export(wrong)
    meta = json.loads((wrong / "generator.json").read_text())
    meta["model"]["ngf"] = 8
    (wrong / "generator.json").write_text(json.dumps(meta))
    fails("--model", wrong, "--input", clip, "--output", out,
          names=wrong / "generator.safetensors")
    # An export of the earlier generator (format /1, other weights): refused, saying why.
    older = tmp_path / "older"
    tiny_export(older)
    meta = json.loads((older / "generator.json").read_text())
    meta["format"] = "tricolor-generator/1"
    (older / "generator.json").write_text(json.dumps(meta))
    assert run("--model", older, "--input", clip, "--output", out) == 1
    err = capsys.readouterr().err
    assert "not a tricolor-generator/2 export" in err and str(older / "generator.json") in err
    assert not out.exists()
    # Outputs that cannot be written.
    nowhere = tmp_path / "no" / "such" / "dir" / "x.mp4"
    assert run("--model", grey_export, "--input", clip, "--output", nowhere) == 1
    assert str(nowhere) in capsys.readouterr().err
    assert run("--model", grey_export, "--input", clip, "--output", tmp_path / "x.xyz") == 1
    assert "x.xyz" in capsys.readouterr().err
    out.write_bytes(b"precious")
    assert run("--model", grey_export, "--input", clip, "--output", out) == 1
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"precious"
    assert run("--model", grey_export, "--input", clip, "--output", out, "--overwrite",
               "--size", 32) == 0
    assert len(decode(out)) == 24


def test_a_failure_midway_leaves_no_output(tmp_path, grey_export, capsys, monkeypatch):
    # moov first (faststart), then cut: the container declares 20 frames, fewer decode.
    whole = write_clip(tmp_path / "whole.mp4", textured_frames(20, 96, 64, seed=4),
                       audio=False, faststart=True)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    out = tmp_path / "out.mp4"
    assert run("--model", grey_export, "--input", cut, "--output", out, "--size", 32) == 1
    assert str(cut) in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "partial" in p.name]
    # Interrupted (Ctrl-C) while writing frames: nothing under the final name either.
    calls = []

    def interrupt(self, rgb, pts=None):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr("inference.video_out.FrameFolderSink.write", interrupt)
    assert run("--model", grey_export, "--input", whole, "--output", tmp_path / "frames",
               "--size", 32) == 130
    assert not (tmp_path / "frames").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


# --- memory ---------------------------------------------------------------------------------

PEAK_RSS = """
import resource, sys
from inference.colorize import main
rc = main(sys.argv[1:])
print("maxrss_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "rc", rc)
"""


def long_clip(path: Path, n: int, width: int = 320, height: int = 240) -> Path:
    rng = np.random.default_rng(0)
    base = (rng.random((height // 16 + 1, (width + 2 * n) // 16 + 2, 3)) * 255).astype(np.uint8)
    canvas = np.kron(base, np.ones((16, 16, 1), dtype=np.uint8))
    with av.open(str(path), "w") as c:
        video = c.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"preset": "ultrafast"}
        for t in range(n):
            rgb = np.ascontiguousarray(canvas[:height, 2 * t: 2 * t + width])
            for packet in video.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                c.mux(packet)
        for packet in video.encode():
            c.mux(packet)
    return path


@pytest.mark.slow
def test_long_input_in_bounded_memory(tmp_path, grey_export):
    """Peak RSS of colorizing 600 frames is that of 60: nothing grows with the length. Were
    the frames kept, 540 more 320x240 RGB frames would add 124 MB (decoded input alone)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    peaks = {}
    for n in (60, 600):
        src = long_clip(tmp_path / f"in{n}.mp4", n)
        proc = subprocess.run(
            [sys.executable, "-c", PEAK_RSS, "--model", str(grey_export), "--input", str(src),
             "--output", str(tmp_path / f"out{n}.mp4"), "--size", "32", "--preset",
             "ultrafast"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        words = proc.stdout.split()
        assert words[words.index("rc") + 1] == "0"
        peaks[n] = int(words[words.index("maxrss_kb") + 1]) / 1024  # MiB (Linux: KiB)
        with av.open(str(tmp_path / f"out{n}.mp4")) as c:
            assert c.streams.video[0].frames == n
    assert peaks[600] - peaks[60] < 30, peaks


# --- never the input, never a folder the tool did not write --------------------------------

def test_output_naming_the_input_is_refused(tmp_path, grey_export, clip, capsys, monkeypatch):
    """Any spelling of the input file (relative, `..`, symbolic or hard link), with or without
    --overwrite; for a frames folder: the folder itself, a folder inside it or around it."""
    src = tmp_path / "in.mp4"
    src.write_bytes(clip.read_bytes())
    original = src.read_bytes()
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.mp4").symlink_to(src)
    os.link(src, tmp_path / "hard.mp4")
    monkeypatch.chdir(tmp_path)
    for out in ("in.mp4", "sub/../in.mp4", tmp_path / "link.mp4", "hard.mp4"):
        for flags in ((), ("--overwrite",)):
            assert run("--model", grey_export, "--input", src, "--output", out, *flags) == 1
            assert "is the input" in capsys.readouterr().err, (out, flags)
            assert src.read_bytes() == original
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, rgb in enumerate(textured_frames(3, 48, 32, seed=3)):
        Image.fromarray(rgb).save(frames / f"f{i}.png")
    (tmp_path / "frames_link").symlink_to(frames)
    before = sorted(p.name for p in frames.iterdir())
    for out, says in (("frames", "is the input"), ("frames_link", "is the input"),
                      ("frames/../frames/", "is the input"), ("frames/colour", "inside"),
                      ("frames/colour.mp4", "inside"), (tmp_path, "contains")):
        assert run("--model", grey_export, "--input", "frames", "--output", out,
                   "--overwrite") == 1
        assert says in capsys.readouterr().err, out
        assert sorted(p.name for p in frames.iterdir()) == before


def test_overwrite_replaces_only_a_frames_folder_it_wrote(tmp_path, grey_export, clip, capsys):
    # A folder holding the input and an unrelated file: refused, left intact.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "in.mp4").write_bytes(clip.read_bytes())
    (mine / "notes.txt").write_text("keep me")
    assert run("--model", grey_export, "--input", mine / "in.mp4", "--output", mine,
               "--overwrite") == 1
    assert str(mine) in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert run("--model", grey_export, "--input", clip, "--output", other, "--overwrite") == 1
    err = capsys.readouterr().err
    assert str(other) in err and "not written by tricolor-colorize" in err
    assert sorted(p.name for p in mine.iterdir()) == ["in.mp4", "notes.txt"]
    assert (mine / "in.mp4").read_bytes() == clip.read_bytes()
    assert (other / "notes.txt").read_text() == "keep me"
    # A folder written by a previous run is replaced (24 frames, then 6).
    out = tmp_path / "frames"
    assert run("--model", grey_export, "--input", clip, "--output", out, "--size", 32) == 0
    assert len(list(out.glob("frame_*.png"))) == 24 and (out / ".tricolor-frames").is_file()
    short = write_clip(tmp_path / "short.mp4", textured_frames(6, 96, 64, seed=7), audio=False)
    assert run("--model", grey_export, "--input", short, "--output", out, "--size", 32,
               "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == [".tricolor-frames"] + [
        f"frame_{i:06d}.png" for i in range(6)]
    # ... unless something else was put in it since.
    (out / "edit.psd").write_bytes(b"work")
    assert run("--model", grey_export, "--input", short, "--output", out, "--size", 32,
               "--overwrite") == 1
    assert "edit.psd" in capsys.readouterr().err and (out / "edit.psd").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name or ".old-" in p.name]


@pytest.mark.slow
def test_sigterm_leaves_no_partial_file(tmp_path, grey_export):
    """A real process, terminated while it writes its output: exit 143, a message, and
    nothing left beside the input (neither OUT nor its hidden temporary)."""
    src = long_clip(tmp_path / "in.mp4", 300)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "inference.colorize", "--model", str(grey_export), "--input",
         str(src), "--output", str(tmp_path / "out.mp4"), "--size", "240", "--preset",
         "ultrafast"], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        deadline = time.monotonic() + 60
        while not any(p.name.startswith(".out.partial") and p.stat().st_size > 0
                      for p in tmp_path.iterdir()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.returncode
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert "terminated" in err
    assert [p.name for p in tmp_path.iterdir()] == ["in.mp4"]


def dead_pid() -> int:
    """The id of a process that has ended (and been reaped): what a killed run leaves."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_sigkilled_runs_partial_output_is_removed_by_the_next_run(tmp_path, grey_export,
                                                                    capsys):
    """A real process killed outright while it writes: its hidden temporary stays (it cannot
    clean up). The next run for the same output removes it and says so, but leaves those of a
    running process, of another host and of another output, byte for byte."""
    src = long_clip(tmp_path / "in.mp4", 300)
    out = tmp_path / "out.mp4"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "inference.colorize", "--model", str(grey_export), "--input",
         str(src), "--output", str(out), "--size", "240", "--preset", "ultrafast"], env=env,
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = temp_name(out, proc.pid)
    try:
        deadline = time.monotonic() + 60
        while not (partial.exists() and partial.stat().st_size > 0):
            assert proc.poll() is None and time.monotonic() < deadline, proc.returncode
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        proc.kill()
    assert partial.is_file() and not out.exists()  # what the killed run left
    sleeper = subprocess.Popen(["sleep", "120"])  # a run still writing, as far as it matters
    try:
        kept = {temp_name(out, sleeper.pid): b"being written",
                tmp_path / f".out.partial-{HOST}x-{dead_pid()}.mp4": b"another host's",
                temp_name(tmp_path / "other.mp4", dead_pid()): b"another output's",
                temp_name(tmp_path / "out.mkv", dead_pid()): b"another container's"}
        for path, data in kept.items():
            path.write_bytes(data)
        capsys.readouterr()
        assert run("--model", grey_export, "--input", long_clip(tmp_path / "short.mp4", 3),
                   "--output", out, "--size", 32) == 0
    finally:
        sleeper.kill()
        sleeper.wait()
    err = capsys.readouterr().err
    assert f"removed {partial}: the partial output of process {proc.pid}, which was killed " \
           "before it finished" in err
    assert not partial.exists() and len(decode(out)) == 3
    assert {path: path.read_bytes() for path in kept} == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["in.mp4", "short.mp4", "out.mp4", *(p.name for p in kept)])


def test_a_dead_runs_partial_frames_folder_is_removed_unless_it_holds_anything_else(
        tmp_path, grey_export, clip, capsys):
    """Frames folders left by dead processes: one holding the marker and frames (what the
    tool writes) is removed; one holding anything else is not the tool's to remove."""
    out = tmp_path / "frames"
    stale, foreign = temp_name(out, dead_pid()), temp_name(out, dead_pid())
    for folder in (stale, foreign):
        folder.mkdir()
        (folder / FRAMES_MARKER).write_text("frames written by tricolor-colorize\n")
        Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(folder / "frame_000000.png")
    (foreign / "notes.txt").write_text("mine")
    assert run("--model", grey_export, "--input", clip, "--output", out, "--size", 32) == 0
    assert f"removed {stale}: the partial output of process" in capsys.readouterr().err
    assert not stale.exists() and (foreign / "notes.txt").read_text() == "mine"
    assert len(list(out.glob("frame_*.png"))) == 24


def test_a_fifo_among_input_frames_is_refused(tmp_path, grey_export, clip, capsys):
    """Only regular files are opened: a FIFO named like a frame would block the read."""
    frames = tmp_path / "in"
    frames.mkdir()
    for i, rgb in enumerate(decode(clip)[:2]):
        Image.fromarray(rgb).save(frames / f"{i:06d}.png")
    os.mkfifo(frames / "000002.png")
    assert run("--model", grey_export, "--input", frames, "--output", tmp_path / "out.mp4",
               "--size", 32) == 1
    assert f"{frames / '000002.png'}: is a FIFO (named pipe), not a regular file" in \
        capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


# --- model settings that do not describe the weights ----------------------------------------

HUGE_NGF = """
import resource, sys
import torch
from inference.model import ModelError, load_model
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_model(sys.argv[1], torch.device("cpu"))
except ModelError as e:
    print("error:", e)
print("grew_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


@pytest.mark.slow
def test_huge_ngf_is_refused_before_anything_is_built(tmp_path):
    """generator.json says ngf=2048 (a 1.2 GB generator) over the weights of ngf=4: refused
    by comparing shapes with the weights' header; the process does not grow by 100 MB."""
    export = tiny_export(tmp_path / "export")
    meta = json.loads((export / "generator.json").read_text())
    meta["model"]["ngf"] = 2048
    (export / "generator.json").write_text(json.dumps(meta))
    cfg = ModelConfig(mode="grey", ngf=2048, depth=2, norm="group")
    with torch.device("meta"):  # what a real build would allocate
        described = sum(t.numel() * 4 for t in build_generator(cfg).state_dict().values())
    assert described > 1e9
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", HUGE_NGF, str(export)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "generator.safetensors" in proc.stdout and "ngf=2048" in proc.stdout
    assert "[2048, 1, 3, 3]" in proc.stdout and "[4, 1, 3, 3]" in proc.stdout  # the shapes
    grew = int(proc.stdout.split("grew_kb")[1]) * 1024
    assert grew < 100 * 2**20, grew


@pytest.mark.parametrize("depth", [100_000, 17, 3])
def test_an_absurd_depth_is_refused_before_anything_is_built(tmp_path, depth):
    """generator.json says depth=100000 (the meta-device build alone would take minutes):
    refused from the settings at once; a plausible wrong depth by the weights' shapes."""
    export = tiny_export(tmp_path / "export")
    meta = json.loads((export / "generator.json").read_text())
    meta["model"]["depth"] = depth
    (export / "generator.json").write_text(json.dumps(meta))
    t0 = time.monotonic()
    with pytest.raises(ModelError) as err:
        load_model(export, torch.device("cpu"))
    assert time.monotonic() - t0 < 2
    message = str(err.value)
    assert str(export / "generator.json") in message and f"depth={depth}" in message
    if depth > 16:
        assert "expected 1..16 (frame sides must be multiples of 2**depth)" in message
    else:
        assert "do not describe these weights" in message


# --- video metadata: display rotation, a size change mid-stream -----------------------------

def player_frames(path: Path) -> list[np.ndarray]:
    """The frames as a player shows them: OpenCV's FFmpeg reader, which applies the display
    rotation itself (CAP_PROP_ORIENTATION_AUTO) -- a reference independent of our code."""
    cap = cv2.VideoCapture(str(path))
    assert cap.get(cv2.CAP_PROP_ORIENTATION_AUTO)
    frames = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(bgr[..., ::-1])
    cap.release()
    return frames


@pytest.mark.parametrize("degrees", [-90, 90, 180])
def test_rotated_video_is_read_upright_by_colorize_and_shards(tmp_path, degrees):
    """A phone video (frames stored sideways, a display matrix to turn them): Source and the
    shards' decode_frames give the frames as a player shows them, with the upright size."""
    # Portrait 48x80, a still (8 px blocks, so halving it is exact): a frame the wrong way
    # round differs from it by about 50 levels on average, codec noise by 3-5.
    upright = textured_frames(1, 48, 80, seed=8, tint=(1.0, 0.6, 0.3)) * 5
    video = rotated_video(tmp_path / "phone.mp4", upright, degrees)
    with av.open(str(video)) as c:  # stored sideways (or upside down), flagged
        frame = next(c.decode(video=0))
        assert frame.rotation % 360 == degrees % 360
        assert (frame.width, frame.height) == ((80, 48) if degrees % 180 else (48, 80))
    shown = player_frames(video)
    assert len(shown) == 5 and shown[0].shape == (80, 48, 3)
    source = Source(video)
    assert (source.width, source.height) == (48, 80)
    ours = [f.rgb for f in source.read()]
    for a, b, truth in zip(ours, shown, upright):
        assert a.shape == (80, 48, 3)
        assert np.abs(a.astype(int) - b).mean() < 3  # what the player shows
        assert np.abs(a.astype(int) - truth).mean() < 6  # the upright picture (codec noise)
    info, frames = decode_frames(video, 24)
    assert (info.width, info.height, info.source_width, info.source_height) == (24, 40, 48, 80)
    assert info.rotation == degrees % 360
    small = list(frames)
    assert len(small) == 5
    for a, truth in zip(small, upright):
        expected = cv2.resize(truth, (24, 40), interpolation=cv2.INTER_AREA)
        assert a.shape == (40, 24, 3) and np.abs(a.astype(int) - expected).mean() < 10


def test_colorize_writes_a_rotated_video_upright(tmp_path, grey_export):
    upright = textured_frames(6, 48, 80, seed=9, tint=(0.9, 0.9, 0.6))
    video = rotated_video(tmp_path / "phone.mp4", upright, -90)
    out = tmp_path / "out.mp4"
    assert run("--model", grey_export, "--input", video, "--output", out, "--size", 32) == 0
    with av.open(str(out)) as c:
        frames = list(c.decode(video=0))
    assert [(f.width, f.height, f.rotation) for f in frames] == [(48, 80, 0)] * 6
    coloured = [f.to_ndarray(format="rgb24") for f in frames]
    assert psnr(luminance(coloured), luminance(upright)) > 30  # the picture, the right way up


def test_a_size_change_mid_stream_is_an_error_naming_file_and_frame(tmp_path, grey_export,
                                                                     capsys):
    video = size_change_video(tmp_path / "change.ts", [(5, 64, 48), (5, 96, 64)])
    with av.open(str(video)) as c:  # the real thing: one stream, frames of two sizes
        assert {(f.width, f.height) for f in c.decode(video=0)} == {(64, 48), (96, 64)}
    info, frames = decode_frames(video, 32)
    assert (info.source_width, info.source_height) == (64, 48)
    with pytest.raises(VideoError, match=r"change\.ts: frame 5 is 96x64"):
        for _ in frames:
            pass
    with pytest.raises(VideoError, match=r"change\.ts: frame 5 is 96x64"):
        list(Source(video).read())
    out = tmp_path / "out.mp4"
    assert run("--model", grey_export, "--input", video, "--output", out, "--size", 32) == 1
    assert f"{video}: frame 5" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["change.ts"]


def test_shards_build_stores_phone_video_upright_and_skips_a_size_change(tmp_path):
    """`tricolor-shards build` (the same decode_frames): the rotated video's frames and
    sizes are upright; the video whose size changes is skipped with the reason, by name."""
    upright = textured_frames(1, 48, 80, seed=8, tint=(1.0, 0.6, 0.3)) * 8
    phone = rotated_video(tmp_path / "phone.mp4", upright, -90)
    change = size_change_video(tmp_path / "change.ts", [(6, 64, 48), (6, 96, 64)])
    out = tmp_path / "shards"
    assert shards_main(["build", str(phone), str(change), "--out", str(out), "--val-fraction",
                        "0", "--short-side", "24"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    (source,) = manifest["sources"]
    assert source["path"] == str(phone)
    assert (source["size"], source["source_size"]) == ([24, 40], [48, 80])
    (skipped,) = manifest["skipped"]
    assert skipped["path"] == str(change) and f"{change}: frame 6 is 96x64" in skipped["reason"]
    expected = cv2.resize(upright[0], (24, 40), interpolation=cv2.INTER_AREA).astype(int)
    tars = [out / s["tar"] for s in manifest["splits"]["train"]["shards"]]
    with tarfile.open(tars[0]) as tar:
        jpegs = [m for m in tar if m.name.endswith(".jpg")]
        assert jpegs
        for member in jpegs:
            rgb = np.asarray(Image.open(tar.extractfile(member)).convert("RGB"))
            assert rgb.shape == (40, 24, 3) and np.abs(rgb - expected).mean() < 10, member.name


@pytest.mark.parametrize("memory", [True, False])
def test_an_export_whose_memory_setting_contradicts_its_weights_is_refused(tmp_path, memory):
    """generator.json records model.memory; settings that say the opposite of the weights are
    refused, saying which way round."""
    export = tiny_export(tmp_path / "export", memory=memory)
    assert load_model(export, torch.device("cpu")).memory is memory
    meta = json.loads((export / "generator.json").read_text())
    assert meta["model"]["memory"] is memory
    meta["model"]["memory"] = not memory
    (export / "generator.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError) as err:
        load_model(export, torch.device("cpu"))
    assert f"the settings say memory={not memory}" in str(err.value)
    assert f"a G {'with' if memory else 'without'} colour memory" in str(err.value)


def test_a_line_art_export_from_before_the_memory_generator_is_refused_by_name(tmp_path):
    export = tiny_export(tmp_path / "export", mode="lineart")
    meta = json.loads((export / "generator.json").read_text())
    del meta["model"]["memory"]  # what exports made before colour memory hold
    (export / "generator.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="line-art export made before the colour-memory"):
        load_model(export, torch.device("cpu"))


# --- batches (slurm/colorize.sbatch) ----------------------------------------------------------


def test_batch_plan_folder_list_and_clashing_names(tmp_path, monkeypatch):
    src = tmp_path / "in"
    for rel in ("a/x.mp4", "b/x.mov", "b/y.MKV", "notes.txt", ".hidden/z.mp4", "a/.x.mp4"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(b"")
    out = src / "colored"  # inside the input folder: its videos are never inputs
    (out / "a").mkdir(parents=True)
    (out / "a" / "x.mp4").write_bytes(b"")
    # a folder: the path under it is kept, so the same name in two folders is no clash
    assert batch_plan(src, out) == [(src / "a/x.mp4", out / "a/x.mp4"),
                                    (src / "b/x.mov", out / "b/x.mp4"),
                                    (src / "b/y.MKV", out / "b/y.mp4")]
    # a list: paths relative to the current folder, OUT/<name>.mp4, comments and repeats skipped
    monkeypatch.chdir(tmp_path)
    listing = tmp_path / "list.txt"
    listing.write_text("# videos\nin/a/x.mp4\n\n  in/b/y.MKV  \nin/a/x.mp4\n")
    assert batch_plan(listing, tmp_path / "o") == [(Path("in/a/x.mp4"), tmp_path / "o/x.mp4"),
                                                   (Path("in/b/y.MKV"), tmp_path / "o/y.mp4")]
    # two inputs for one output: refused, naming both, before anything is done
    listing.write_text("in/a/x.mp4\nin/b/x.mov\n")
    with pytest.raises(BatchError, match=r"in/a/x.mp4 and in/b/x.mov -> .*o/x.mp4"):
        batch_plan(listing, tmp_path / "o")
    (src / "a" / "x.mov").write_bytes(b"")  # x.mov beside x.mp4 in a folder
    with pytest.raises(BatchError, match="written by two inputs"):
        batch_plan(src, out)
    # one file under several spellings (absolute, `..`, a symbolic link of the same name or
    # another): one video, colorized once under its first spelling
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.mp4").symlink_to(src / "a/x.mp4")
    (tmp_path / "link.mp4").symlink_to(src / "a/x.mp4")
    listing.write_text(f"in/a/x.mp4\n{src / 'a/x.mp4'}\nin/b/../a/x.mp4\nelsewhere/x.mp4\n"
                       "link.mp4\n")
    assert batch_plan(listing, tmp_path / "o") == [(Path("in/a/x.mp4"), tmp_path / "o/x.mp4")]
    listing.write_text("# nothing\n")
    with pytest.raises(BatchError, match="lists no videos"):
        batch_plan(listing, out)
    with pytest.raises(BatchError, match="no such folder or list file"):
        batch_plan(tmp_path / "missing", out)


def test_batch_task_slices_and_skips_complete_outputs(tmp_path, grey_export, clip):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(5):
        (src / f"v{i}.mp4").symlink_to(clip)
    out = tmp_path / "out"
    out.mkdir()
    assert run("--model", grey_export, "--input", src / "v2.mp4", "--output", out / "v2.mp4",
               "--size", 32) == 0
    assert output_complete(out / "v2.mp4")
    (out / "v4.mp4").write_bytes(b"half a video")  # not this tool's: left alone, reported
    assert not output_complete(out / "v4.mp4") and not output_complete(out / "v0.mp4")
    assert batch_task(src, out, 0, 2) == [("todo", src / "v0.mp4", out / "v0.mp4"),
                                          ("done", src / "v2.mp4", out / "v2.mp4"),
                                          ("blocked", src / "v4.mp4", out / "v4.mp4")]
    assert [s for s, _, _ in batch_task(src, out, 1, 2)] == ["todo", "todo"]
    with pytest.raises(BatchError, match="not a task"):
        batch_task(src, out, 2, 2)
