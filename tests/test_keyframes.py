"""Colour keyframes (inference/keyframes.py): tricolor-colorize --keyframes (a folder of
images, a video at listed frames or at cuts), the colour memory going on from a keyframe, bad
keyframes, and tricolor-eval's keyframe protocols; tiny random models, small synthetic
videos (64x48, worked on at 32x24: the area averaging is an exact 2x2 mean)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import cv2
import kornia
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_colorize import decode, stub, tiny_export, write_clip
from torch import nn
from videos import scene_video, textured_frames

from inference.colorize import main as colorize_main
from inference.colorizer import Colorizer, prepare
from inference.evaluate import METHODS
from inference.evaluate import main as evaluate_main
from inference.keyframes import KeyframeError, KeyframeFolder, TruthKeyframes, parse_frame_list
from inference.video_in import ORIENTATIONS, Source
from inference.video_out import FRAMES_MARKER
from models.colour import AB_SCALE, compose_grey

SIZE = 24  # --size: 64x48 frames are worked on at 32x24

pytestmark = pytest.mark.usefixtures("one_thread")


# --- helpers --------------------------------------------------------------------------------

def colorize(*args) -> int:
    return colorize_main([str(a) for a in args])


def evaluate(*args) -> int:
    return evaluate_main([str(a) for a in args])


def retint(rgb: np.ndarray) -> np.ndarray:
    """Another colouring of a frame: channels rotated (R<-B, G<-R, B<-G), 30% towards grey so
    that its a,b on the original's luminance stay inside sRGB (measured: 0.16..0.77 of [0, 1])."""
    turned = rgb[..., [2, 0, 1]].astype(float)
    mixed = 0.7 * turned + 0.3 * turned.mean(axis=-1, keepdims=True)
    return np.clip(mixed, 0, 255).round().astype(np.uint8)


def greyscale(rgb: np.ndarray) -> np.ndarray:
    return np.repeat(rgb.mean(axis=-1, keepdims=True), 3, -1).round().astype(np.uint8)


def lab(rgb: np.ndarray) -> torch.Tensor:
    """CIE Lab [3, H, W] of an RGB uint8 frame (kornia, as the model's data pipeline)."""
    x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float()[None] / 255
    return kornia.color.rgb_to_lab(x)[0]


def working(x: torch.Tensor) -> torch.Tensor:
    """[..., 48, 64] -> [..., 24, 32]: area averaging to the working size (2x2 means)."""
    return F.avg_pool2d(x.reshape(-1, *x.shape[-3:]), 2).reshape(*x.shape[:-2], 24, 32)


def keyframe_folder(folder: Path, images: dict[int | str, np.ndarray | bytes]) -> Path:
    """PNG keyframes named by frame index (000003.png), or by the name given; bytes as is."""
    folder.mkdir()
    for key, image in images.items():
        path = folder / (f"{key:06d}.png" if isinstance(key, int) else key)
        if isinstance(image, bytes):
            path.write_bytes(image)
        else:
            Image.fromarray(image).save(path)
    return folder


# How each EXIF orientation stores an image that a viewer shows as `upright` (the viewer
# undoes it), written out from the EXIF specification's table rather than taken from Pillow.
STORED = {1: lambda u: u, 2: np.fliplr, 3: lambda u: np.rot90(u, 2), 4: np.flipud,
          5: lambda u: u.swapaxes(0, 1), 6: lambda u: np.rot90(u, 1),
          7: lambda u: np.rot90(u, 2).swapaxes(0, 1), 8: lambda u: np.rot90(u, -1)}


def exif_jpeg(path: Path, stored: np.ndarray, orientation: int) -> Path:
    """A JPEG as a phone writes it: the pixels as stored and an EXIF orientation tag (near
    lossless: quality 98, no chroma subsampling)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.ascontiguousarray(stored)).save(path, exif=exif, quality=98,
                                                       subsampling=0)
    return path


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler & Suesstrunk's M of an RGB uint8 frame: sigma_rgyb + 0.3 mu_rgyb."""
    R, G, B = np.moveaxis(rgb.astype(float), -1, 0)
    rg, yb = R - G, (R + G) / 2 - B
    return math.hypot(rg.std(), yb.std()) + 0.3 * math.hypot(rg.mean(), yb.mean())


def read_frames(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("frame_*.png"))]


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file and folder under `folder` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


# --- shared models and videos ---------------------------------------------------------------

@pytest.fixture(scope="module")
def memory_export(tmp_path_factory) -> Path:
    """A tiny random grey-mode generator with colour memory (model.memory=true)."""
    return tiny_export(tmp_path_factory.mktemp("memory") / "export", memory=True)


@pytest.fixture(scope="module")
def lineart_export(tmp_path_factory) -> Path:
    """A tiny random line-art generator: its output at a keyframe is the keyframe itself."""
    return tiny_export(tmp_path_factory.mktemp("lineart") / "export", mode="lineart")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """6 colour frames of 64x48, mid-tones only (levels 64..191), no audio."""
    frames = [(64 + f // 2).astype(np.uint8)
              for f in textured_frames(6, 64, 48, seed=1, tint=(1.0, 0.8, 0.5))]
    return write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", frames, audio=False)


@pytest.fixture(scope="module")
def clip_frames(clip) -> list[np.ndarray]:
    """The clip's frames as decoded: the input the tool sees."""
    return decode(clip)


@pytest.fixture(scope="module")
def two_scenes(tmp_path_factory) -> Path:
    """Two scenes of 4 and 5 frames (a hard cut before frame 4), 64x48."""
    return scene_video(tmp_path_factory.mktemp("scenes") / "cut.mp4", [4, 5], width=64,
                       height=48)


# --- at a keyframe --------------------------------------------------------------------------

def test_at_a_keyframe_the_output_takes_its_colour_on_the_inputs_luminance(
        tmp_path, memory_export, clip, clip_frames):
    given = {0: retint(clip_frames[0]), 3: retint(clip_frames[3])}
    out = tmp_path / "out"
    assert colorize("--model", memory_export, "--input", clip, "--output", out, "--size", SIZE,
                    "--keyframes", keyframe_folder(tmp_path / "keyframes", given)) == 0
    frames = read_frames(out)
    assert len(frames) == 6
    for t, frame in enumerate(frames):  # the input's luminance everywhere (8-bit rounding)
        assert (lab(frame)[0] - lab(clip_frames[t])[0]).abs().max() < 1, t
    for t, keyframe in given.items():
        # The keyframe's a,b, not the input's (they differ by ~27 units on average), at the
        # working size and at full resolution (not the working size's colour upsampled: off
        # by 2 on average, 19 at most). An 8-bit level moves a,b by up to ~1 unit at these
        # luminances (measured: mean 0.13, max 0.44).
        ab, expected = lab(frames[t])[1:], lab(keyframe)[1:]
        assert (working(expected) - working(lab(clip_frames[t])[1:])).abs().mean() > 20
        for got, want in ((working(ab), working(expected)), (ab, expected)):
            assert (got - want).abs().mean() < 0.5, t
            assert (got - want).abs().max() < 2, t
    for t in (1, 2, 4, 5):  # the model's own colour (random: far from the keyframe's)
        ab, previous = working(lab(frames[t])[1:]), working(lab(given[0 if t < 3 else 3])[1:])
        assert (ab - previous).abs().mean() > 5, t


def test_lineart_output_at_a_keyframe_is_the_keyframe_resized_if_need_be(
        tmp_path, clip, clip_frames, capsys):
    """A line-art model's output at a keyframe is the keyframe itself; one of the input's
    aspect at twice its size is accepted, resized (area averaging), and the tool says so."""
    export = tiny_export(tmp_path / "lineart", mode="lineart")
    same = retint(clip_frames[2])
    big = cv2.resize(retint(clip_frames[4]), (128, 96), interpolation=cv2.INTER_CUBIC)
    keyframes = keyframe_folder(tmp_path / "keyframes", {2: same, 4: big})
    out = tmp_path / "out"
    assert colorize("--model", export, "--input", clip, "--output", out, "--size", SIZE,
                    "--keyframes", keyframes) == 0
    err = capsys.readouterr().err
    assert f"{keyframes / '000004.png'}: 128x96 resized to the input's 64x48" in err
    assert "000002.png" not in err  # the input's size: not resized
    frames = read_frames(out)
    assert len(frames) == 6
    assert np.array_equal(frames[2], same)
    means = big.reshape(48, 2, 64, 2, 3).mean(axis=(1, 3))  # area averaging: 2x2 means
    assert np.abs(frames[4] - means).max() <= 0.5  # (rounded)
    for t in (1, 3, 5):
        assert np.abs(frames[t].astype(int) - clip_frames[t]).mean() > 10, t


# --- the memory goes on from a keyframe -----------------------------------------------------

class RecordingMemoryGrey(nn.Module):
    """Stands in for a GreyUNet with colour memory: records each memory (a, b, present),
    returns a new constant a,b per call."""

    def __init__(self):
        super().__init__()
        self.memories, self.outs, self.temporal = [], [], True

    def forward(self, cond, memory):
        self.memories.append(memory.clone())
        out = torch.full((cond.shape[0], 2, *cond.shape[-2:]), 0.05 * len(self.outs) - 0.2)
        self.outs.append(out)
        return out


# Per case: the keyframes (frame -> where its colour comes from) and the memory of each
# frame G runs at (G does not run at a keyframe): "none", ("key", frame): the keyframe's
# colour, ("out", n): G's n-th output. Scenes: frames 0-3 and 4-8.
MEMORY_CASES = {
    "no keyframes": ({}, ["none", ("out", 0), ("out", 1), ("out", 2), "none", ("out", 4),
                          ("out", 5), ("out", 6), ("out", 7)]),
    "truth at scene starts": ({0: "truth", 4: "truth"},
                              [("key", 0), ("out", 0), ("out", 1), ("key", 4), ("out", 3),
                               ("out", 4), ("out", 5)]),
    "folder at 1 and 6": ({1: "retint", 6: "retint"},
                          ["none", ("key", 1), ("out", 1), "none", ("out", 3), ("key", 6),
                           ("out", 5)]),
}


@pytest.mark.parametrize("case", MEMORY_CASES)
def test_memory_goes_on_from_a_keyframe_and_restarts_at_a_cut_without_one(
        tmp_path, two_scenes, case):
    keyframes, expected = MEMORY_CASES[case]
    source, G = Source(two_scenes), RecordingMemoryGrey()
    model = stub(G, "grey", memory=True)
    truth = [f.rgb for f in source.read()]
    colours = {t: truth[t] if how == "truth" else retint(truth[t]) for t, how in keyframes.items()}
    items = prepare(source.read(), (32, 24), model, torch.device("cpu"), 25.0)
    if "truth" in keyframes.values():  # tricolor-eval's stage: the truth at scene starts
        items = TruthKeyframes("first")(items)
    elif colours:
        folder = keyframe_folder(tmp_path / "keyframes", colours)
        items = KeyframeFolder(folder, 64, 48, len(truth))(items)
    items = list(Colorizer(model)(items, "out"))
    assert [it.scene for it in items] == [0] * 4 + [1] * 5
    assert [it.index for it in items if it.keyframe is not None] == sorted(keyframes)
    assert len(G.memories) == len(expected)  # G runs at every frame but the keyframes
    runs_at = [t for t in range(len(items)) if t not in keyframes]
    for n, (memory, want) in enumerate(zip(G.memories, expected)):
        assert memory.shape == (1, 4, 24, 32)
        if want == "none":
            assert not memory.any(), n  # grey mode's "no memory": all zeros
            continue
        kind, k = want  # the keyframe's a,b at the working size, or G's; present = 1
        ab = working(lab(colours[k])[1:] / AB_SCALE)[None] if kind == "key" else G.outs[k]
        previous = items[runs_at[n] - 1].cond[None]  # the L of the frame the colour is of
        expected = torch.cat([ab, torch.ones_like(ab[:, :1]), previous], dim=1)
        assert torch.allclose(memory, expected, atol=1e-5), (n, want)


# --- a keyframe video -----------------------------------------------------------------------

@pytest.mark.parametrize("choice, given", [(["--keyframe-at-cuts"], {0, 4}),
                                           (["--keyframe-frames", "0,2"], {0, 2})])
def test_a_keyframe_video_at_cuts_or_at_listed_frames(tmp_path, memory_export, two_scenes,
                                                      choice, given):
    """The input itself as the keyframe video: at a keyframe the output is the input (its
    own colour on its own luminance, up to 8-bit rounding); elsewhere the random model's."""
    out = tmp_path / "out"
    assert colorize("--model", memory_export, "--input", two_scenes, "--output", out,
                    "--size", SIZE, "--keyframes", two_scenes, *choice) == 0
    frames, truth = read_frames(out), decode(two_scenes)
    assert len(frames) == len(truth) == 9
    for t, (frame, rgb) in enumerate(zip(frames, truth)):
        diff = np.abs(frame.astype(int) - rgb)
        if t in given:
            assert diff.max() <= 1, t  # measured: exact
        else:
            assert diff.mean() > 10, t  # measured: 54 or more


def test_keyframe_images_are_read_as_a_viewer_shows_them(tmp_path, lineart_export, clip,
                                                       clip_frames, capsys):
    """Phone JPEGs stored mirrored, upside down or sideways with their EXIF orientation tag:
    each is used as a viewer shows it (the line-art model's output at a keyframe is the
    keyframe itself), and the tool says so in one line per image. Stored 48x64, the sideways
    ones are not refused as another aspect."""
    keyframes = tmp_path / "keyframes"
    keyframes.mkdir()
    upright, paths = {}, {}
    for t, orientation in enumerate([2, 3, 5, 6, 7, 8]):
        upright[t] = retint(clip_frames[t])
        stored = STORED[orientation](upright[t])
        paths[t] = exif_jpeg(keyframes / f"{t:06d}.jpg", stored, orientation)
        assert stored.shape[:2] == ((48, 64) if orientation < 5 else (64, 48))
    out = tmp_path / "out"
    assert colorize("--model", lineart_export, "--input", clip, "--output", out, "--size", SIZE,
                    "--keyframes", keyframes) == 0
    err = capsys.readouterr().err
    frames = read_frames(out)
    for t, orientation in enumerate([2, 3, 5, 6, 7, 8]):
        lines = [x for x in err.splitlines() if str(paths[t]) in x]
        assert lines == [f"keyframes: {paths[t]}: EXIF orientation {orientation} ("
                         f"{ORIENTATIONS[orientation]}) applied, as image viewers show it"], err
        diff = np.abs(frames[t].astype(int) - upright[t])
        assert diff.mean() < 1 and diff.max() <= 8, (t, diff.mean(), diff.max())  # JPEG
        if orientation < 5:  # the stored pixels, not turned: far off
            stored = np.asarray(Image.open(paths[t]).convert("RGB")).astype(int)
            assert np.abs(frames[t].astype(int) - stored).mean() > 20, t


def test_a_keyframe_copied_from_an_input_frame_lines_up_whatever_its_exif(tmp_path,
                                                                         memory_export, capsys):
    """Input frames are read as a viewer shows them too, so a copy of an input frame that
    carries a rotation tag is that frame as shown: both are turned, and they line up."""
    frames_dir, keyframes, out = tmp_path / "in", tmp_path / "kf", tmp_path / "out"
    frames_dir.mkdir(), keyframes.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 3  # "rotate 180" (a PNG or JPEG from a phone)
    for i, rgb in enumerate(textured_frames(3, 64, 48, seed=1, tint=(1, 0.8, 0.5))):
        Image.fromarray(rgb).save(frames_dir / f"{i:06d}.png", exif=exif.tobytes())
    (keyframes / "000000.png").write_bytes((frames_dir / "000000.png").read_bytes())
    assert colorize("--model", memory_export, "--input", frames_dir, "--output", out,
                    "--size", SIZE, "--keyframes", keyframes) == 0
    err = capsys.readouterr().err
    assert f"input: {frames_dir / '000000.png'}: EXIF orientation 3 (turned 180°) applied" in err
    assert f"keyframes: {keyframes / '000000.png'}: EXIF orientation 3 (turned 180°) applied" \
        in err
    stored = np.asarray(Image.open(frames_dir / "000000.png").convert("RGB")).astype(int)
    assert np.abs(read_frames(out)[0].astype(int) - np.rot90(stored, 2)).max() <= 1


def test_an_opaque_alpha_channel_is_fine(tmp_path):
    """RGBA and palette images whose every pixel is opaque are their colour; only pixels a
    viewer would hide are refused (see the bad keyframes)."""
    colour = retint(textured_frames(1, 64, 48, seed=3)[0])
    rgba = np.dstack([colour, np.full((48, 64), 255, np.uint8)])
    palette = Image.fromarray(colour).quantize(16)
    folder = keyframe_folder(tmp_path / "kf", {0: rgba})
    palette.save(folder / "000001.png", transparency=255)  # an index no pixel uses
    assert palette.getextrema()[1] < 255
    frames = KeyframeFolder(folder, 64, 48, 6).frames
    assert np.array_equal(frames[0], colour)
    assert np.array_equal(frames[1], np.asarray(palette.convert("RGB")))


@pytest.mark.parametrize("text, frames", [("0,120,240", [0, 120, 240]), ("7", [7]),
                                          (" 3, 1 ,3", [1, 3]), ("0012", [12])])
def test_frame_lists_of_plain_decimal_indices(text, frames):
    assert parse_frame_list(text) == frames


@pytest.mark.parametrize("text", ["0_1", "+1", "-1", "1.0", "0x10", "١", "１", "1,,2", "1,",
                                  "", "1e2"])
def test_frame_lists_refuse_anything_else(text):
    """int() takes "0_1" (as 1), "+1", "١" and "１"; a frame list does not."""
    with pytest.raises(KeyframeError, match="is not a frame index; expected plain decimal "
                       "indices separated by commas"):
        parse_frame_list(text)


def test_at_cuts_a_scene_start_without_colour_is_skipped(tmp_path, memory_export, two_scenes,
                                                        capsys):
    """A fade from black or a title card at a cut: not a keyframe, said, and the rest goes
    on (the grey frame is not pasted in)."""
    frames = decode(two_scenes)
    frames[4] = greyscale(frames[4])
    graded = write_clip(tmp_path / "graded.mp4", frames, audio=False)
    out = tmp_path / "out"
    assert colorize("--model", memory_export, "--input", two_scenes, "--output", out,
                    "--size", SIZE, "--keyframes", graded, "--keyframe-at-cuts") == 0
    assert "frame 4: a scene start without colour, not used" in capsys.readouterr().err
    made = read_frames(out)
    # frame 0 is used: its colour on the input's L (the graded clip is a lossy re-encode)
    assert np.abs(made[0].astype(int) - decode(graded)[0]).mean() < 3
    assert np.abs(made[4].astype(int) - decode(graded)[4]).mean() > 10


def test_the_output_may_not_be_the_keyframe_video(tmp_path, memory_export, clip, capsys):
    graded = tmp_path / "graded.mp4"
    graded.write_bytes(clip.read_bytes())
    assert colorize("--model", memory_export, "--input", clip, "--output", graded,
                    "--overwrite", "--keyframes", graded, "--keyframe-frames", "0") == 1
    assert "is the input" in capsys.readouterr().err
    assert graded.read_bytes() == clip.read_bytes()


# --- bad keyframes --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_keyframes(tmp_path_factory, clip, clip_frames) -> dict:
    """Case -> (model: "memory" or "plain", input, keyframe arguments, what stderr says)."""
    tmp = tmp_path_factory.mktemp("bad")
    colour = retint(clip_frames[1])

    def folder(name: str, images: dict) -> tuple[list, Path]:
        path = keyframe_folder(tmp / name, images)
        return ["--keyframes", path], path

    aspect, aspect_dir = folder("aspect", {1: np.ascontiguousarray(colour[:, :48])})
    past, past_dir = folder("past", {0: colour, 99: colour})
    grey, grey_dir = folder("grey", {1: greyscale(colour)})
    garbage, garbage_dir = folder("garbage", {1: b"not a PNG at all" * 20})
    unnamed, unnamed_dir = folder("unnamed", {1: colour, "first.png": colour})
    plain, _ = folder("plain", {1: colour})
    twice, twice_dir = folder("twice", {1: colour, "1.png": colour})
    short = write_clip(tmp / "short.mp4", clip_frames[:4], audio=False)
    short_ts = write_clip(tmp / "short.ts", clip_frames[:4], audio=False)  # length unknown
    grey_video = write_clip(tmp / "grey.mp4", [greyscale(f) for f in clip_frames], audio=False)
    clip_ts = write_clip(tmp / "clip.ts", clip_frames, audio=False)  # length unknown
    long_ts = write_clip(tmp / "long.ts", clip_frames + clip_frames[:2], audio=False)
    # A phone photo tagged "turn 90°" whose stored pixels have the input's aspect: as shown,
    # portrait; and a tag outside the specification's 1..8.
    sideways, sideways_dir = folder("sideways", {})
    exif_jpeg(sideways_dir / "000001.jpg", colour, 6)
    bad_tag, bad_tag_dir = folder("bad-tag", {})
    exif_jpeg(bad_tag_dir / "000001.jpg", colour, 9)
    # Transparent pixels whose hidden colour is bright red: RGBA, and a palette's tRNS.
    rgba = np.dstack([colour, np.full((48, 64), 255, np.uint8)])
    rgba[:2, :5] = (255, 0, 0, 0)
    transparent, transparent_dir = folder("transparent", {1: rgba})
    palette_dir = tmp / "palette"
    palette_dir.mkdir()
    Image.fromarray(colour).quantize(16).save(palette_dir / "000001.png", transparency=0)
    fifo, fifo_dir = folder("fifo", {0: colour})
    os.mkfifo(fifo_dir / "000001.png")  # opening it to read would wait for a writer
    fifo_video = tmp / "graded.mp4"
    os.mkfifo(fifo_video)
    digits, digits_dir = folder("digits", {"\u0661.png": colour})  # Arabic-Indic 1: int() takes it
    return {
        "EXIF orientation of another aspect": (
            "memory", clip, sideways,
            [str(sideways_dir / "000001.jpg"), "is 48x64 as shown, after its EXIF orientation 6 "
             "(turned 90° clockwise), the input 64x48: another aspect ratio"]),
        "EXIF orientation outside 1..8": (
            "memory", clip, bad_tag,
            [str(bad_tag_dir / "000001.jpg"), "EXIF orientation tag (0x0112) is 9, not one of "
             "1..8", "expected a valid tag"]),
        "transparent pixels": ("memory", clip, transparent,
                               [str(transparent_dir / "000001.png"), "10 of 3072 pixels are "
                                "not opaque", "expected an opaque image"]),
        "transparent palette entry": ("memory", clip, ["--keyframes", palette_dir],
                                      [str(palette_dir / "000001.png"), "pixels are not opaque",
                                       "expected an opaque image"]),
        "a FIFO named like a keyframe": ("memory", clip, fifo,
                                         [str(fifo_dir / "000001.png"), "is a FIFO (named pipe), "
                                          "not a regular file; expected an image file"]),
        "a FIFO as the keyframe video": ("memory", clip, ["--keyframes", fifo_video,
                                                          "--keyframe-frames", "0"],
                                         [str(fifo_video), "is a FIFO (named pipe), not a "
                                          "regular file; expected a colour video file"]),
        "frame list 0_1": ("memory", clip, ["--keyframes", clip, "--keyframe-frames", "0_1"],
                           ["--keyframe-frames '0_1': '0_1' is not a frame index; expected "
                            "plain decimal indices"]),
        "index in other digits": ("memory", clip, digits,
                                  [str(digits_dir / "\u0661.png"), "not named by a frame index"]),
        "video longer, length unknown": ("memory", clip, ["--keyframes", long_ts,
                                                          "--keyframe-at-cuts"],
                                         [f"{long_ts}: longer than the input (6 frames)",
                                          "expected a keyframe video as long as the input"]),
        "another aspect": ("memory", clip, aspect,
                           [str(aspect_dir / "000001.png"), "is 48x48, the input 64x48",
                            "another aspect ratio"]),
        "index past the end": ("memory", clip, past,
                               [str(past_dir / "000099.png"), "past the input's end",
                                "it has 6 frames"]),
        "index past the end, length unknown": ("memory", clip_ts, past,
                                               [str(past_dir), "frame 99 is past the input's "
                                                "end (it has 6 frames)"]),
        "video frame past the end": ("memory", clip, ["--keyframes", clip, "--keyframe-frames",
                                                      "0,99"],
                                     ["--keyframe-frames: frame 99 is past the input's end"]),
        "model without memory": ("plain", clip, plain, ["without colour memory",
                                                        "model.memory=false"]),
        "greyscale image": ("memory", clip, grey,
                            [str(grey_dir / "000001.png"), "greyscale keyframe"]),
        "greyscale video frame": ("memory", clip, ["--keyframes", grey_video,
                                                   "--keyframe-frames", "2"],
                                  [f"{grey_video} frame 2", "greyscale keyframe"]),
        "unreadable image": ("memory", clip, garbage,
                             [str(garbage_dir / "000001.png"), "not a readable image"]),
        "video shorter": ("memory", clip, ["--keyframes", short, "--keyframe-at-cuts"],
                          [str(short), "4 frames, the input 6",
                           "expected a keyframe video as long as the input"]),
        "video shorter, length unknown": ("memory", clip, ["--keyframes", short_ts,
                                                           "--keyframe-at-cuts"],
                                          [f"{short_ts}: ends at frame 4",
                                           "expected a keyframe video as long as the input"]),
        "not named by an index": ("memory", clip, unnamed,
                                  [str(unnamed_dir / "first.png"), "not named by a frame index"]),
        "two for one frame": ("memory", clip, twice,
                              [str(twice_dir), "a second keyframe for frame 1"]),
        "a folder at cuts": ("memory", clip, [*plain, "--keyframe-at-cuts"],
                             ["a folder of keyframes is indexed by its file names"]),
    }


def make_earlier_output(out: Path) -> None:
    """What an earlier run left (a video, or a frames folder with its marker)."""
    if out.suffix:
        out.write_bytes(b"an earlier video")
        return
    out.mkdir()
    (out / FRAMES_MARKER).write_text("frames written by tricolor-colorize\n")
    Image.fromarray(np.full((48, 64, 3), 90, np.uint8)).save(out / "frame_000000.png")


BAD_CASES = ["another aspect", "index past the end", "index past the end, length unknown",
             "video frame past the end", "model without memory", "greyscale image",
             "greyscale video frame", "unreadable image", "video shorter",
             "video shorter, length unknown", "video longer, length unknown",
             "not named by an index", "two for one frame", "a folder at cuts",
             "EXIF orientation of another aspect", "EXIF orientation outside 1..8",
             "transparent pixels", "transparent palette entry", "a FIFO named like a keyframe",
             "a FIFO as the keyframe video", "frame list 0_1", "index in other digits"]


@pytest.mark.timeout(120)  # a FIFO opened for reading would otherwise block until the 600 s
@pytest.mark.parametrize("output", ["out.mp4", "frames"])
@pytest.mark.parametrize("case", BAD_CASES)
def test_a_bad_keyframe_is_an_error_that_leaves_no_output(
        tmp_path, memory_export, grey_export, bad_keyframes, case, output, capsys):
    """Exit status 1 and a message naming the file and what was expected; nothing new in the
    output's folder (neither OUT nor a temporary), an earlier OUT untouched by --overwrite.
    Some are found up front, some (a video's frames, an input of unknown length) only while
    frames are being written."""
    model, src, args, says = bad_keyframes[case]
    model = memory_export if model == "memory" else grey_export
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / output
    for overwrite in ([], ["--overwrite"]):
        if overwrite:
            make_earlier_output(out)
        before = snapshot(folder)
        assert colorize("--model", model, "--input", src, "--output", out, "--size", SIZE,
                        *args, *overwrite) == 1
        err = capsys.readouterr().err
        assert "tricolor-colorize: error:" in err
        for words in says:
            assert words in err, (words, err)
        assert snapshot(folder) == before, overwrite


# --- tricolor-eval's protocols --------------------------------------------------------------

@pytest.fixture(scope="module")
def eval_video(tmp_path_factory) -> Path:
    """Two scenes of 6 frames, 64x48."""
    return scene_video(tmp_path_factory.mktemp("eval") / "cut.mp4", [6, 6], width=64,
                       height=48)


def eval_report(tmp_path: Path, export: Path, video: Path, protocol: str,
                capsys) -> tuple[dict, str]:
    out = tmp_path / f"{protocol.replace(':', '_')}.json"
    assert evaluate("--model", export, "--videos", video, "--json", out, "--size", SIZE,
                    "--keyframes", protocol) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def test_eval_first_gives_the_scene_starts_and_leaves_them_out_of_the_per_frame_scores(
        tmp_path, memory_export, eval_video, capsys):
    none, none_table = eval_report(tmp_path, memory_export, eval_video, "none", capsys)
    first, first_table = eval_report(tmp_path, memory_export, eval_video, "first", capsys)
    assert none["protocol"] == "automatic: no colour given"
    assert none_table.startswith("protocol: automatic: no colour given")
    assert first["protocol"] == "keyframes: the truth's first frame of every scene"
    assert first_table.startswith("protocol: keyframes: the truth's first frame of every scene")
    assert "2 keyframes given, not scored" in first_table
    (auto,), (given,) = none["videos"], first["videos"]
    assert (auto["keyframes"], auto["scored_frames"], auto["frames"]) == ([], 12, 12)
    assert (given["keyframes"], given["scored_frames"], given["frames"]) == ([0, 6], 10, 12)
    for method in METHODS:
        curve = given["psnr_by_frame"][method]
        assert [t for t, x in enumerate(curve) if x is None] == [0, 6], method
        assert all(math.isfinite(x) for x in auto["psnr_by_frame"][method]), method
    # The greyscale baseline does not depend on the protocol: the same PSNR at every scored
    # frame, and over the video the PSNR of the mean squared error of the scored frames.
    zero, zero_auto = given["psnr_by_frame"]["zero_chroma"], auto["psnr_by_frame"]["zero_chroma"]
    scored = [t for t in range(12) if t not in (0, 6)]
    assert [zero[t] for t in scored] == pytest.approx([zero_auto[t] for t in scored], rel=1e-9)
    mse = np.mean([10 ** (-zero[t] / 10) for t in scored])  # frames of equal size
    psnr = given["methods"]["zero_chroma"]["psnr"]
    assert psnr == pytest.approx(-10 * math.log10(mse), abs=1e-6)
    assert abs(psnr - auto["methods"]["zero_chroma"]["psnr"]) > 0.01
    # The truth's colourfulness: the mean over the scored frames; the temporal scores keep
    # every frame, so they are the automatic protocol's.
    truth = decode(eval_video)
    expected = np.mean([colourfulness(truth[t]) for t in scored])
    assert given["methods"]["model"]["colourfulness_truth"] == pytest.approx(expected, rel=1e-6)
    for key in ("cdc", "cdc_truth", "warp", "warp_truth"):
        assert given["methods"]["zero_chroma"][key] == pytest.approx(
            auto["methods"]["zero_chroma"][key], rel=1e-9), key


def test_eval_keyframe_copy_pastes_the_scenes_keyframe_on_its_later_frames(
        tmp_path, memory_export, eval_video, capsys):
    """The copy baseline: each scored frame is the scene's keyframe's a,b on the frame's own
    L, scored like the other methods (checked against that frame made here)."""
    auto, _ = eval_report(tmp_path, memory_export, eval_video, "none", capsys)
    first, table = eval_report(tmp_path, memory_export, eval_video, "first", capsys)
    assert "keyframe_copy" not in auto["videos"][0]["methods"]
    assert "keyframe_copy" in table
    curve = first["videos"][0]["psnr_by_frame"]["keyframe_copy"]
    truth = decode(eval_video)
    for t in range(12):
        if t in (0, 6):
            assert curve[t] is None
            continue
        ab = torch.from_numpy(lab(truth[6 if t > 6 else 0])[1:].numpy() / AB_SCALE)
        pasted = compose_grey(truth[t], ab).astype(np.float64) / 255
        mse = np.mean((pasted - truth[t] / 255) ** 2)
        assert curve[t] == pytest.approx(-10 * math.log10(mse), abs=1e-3), t
    assert first["overall"]["keyframe_copy"]["psnr"] > first["overall"]["zero_chroma"]["psnr"]


def test_eval_keyframe_flow_follows_the_motion_that_keyframe_copy_ignores(
        tmp_path, memory_export, eval_video, capsys):
    """The scenes drift 2 px a frame: the keyframe sampled through the chained flow lines up
    with each later frame, the pasted one does not; both are scored the same way."""
    report, table = eval_report(tmp_path, memory_export, eval_video, "first", capsys)
    assert "keyframe_flow" in table
    (video,) = report["videos"]
    flow, copy = video["psnr_by_frame"]["keyframe_flow"], video["psnr_by_frame"]["keyframe_copy"]
    assert [t for t, x in enumerate(flow) if x is None] == [0, 6]
    later = [t for t in range(12) if t not in (0, 6)]
    assert sum(flow[t] > copy[t] for t in later) >= len(later) - 1
    assert report["overall"]["keyframe_flow"]["psnr"] > report["overall"]["keyframe_copy"]["psnr"]


def test_eval_every_n_gives_every_n_th_frame(tmp_path, memory_export, eval_video, capsys):
    report, table = eval_report(tmp_path, memory_export, eval_video, "every:4", capsys)
    assert report["keyframes"] == "every:4" and "every 4-th frame" in report["protocol"]
    assert table.startswith(f"protocol: {report['protocol']}")
    (video,) = report["videos"]
    assert (video["keyframes"], video["scored_frames"]) == ([0, 4, 8], 9)
    for curve in video["psnr_by_frame"].values():
        assert [t for t, x in enumerate(curve) if x is None] == [0, 4, 8]


@pytest.mark.parametrize("protocol", ["every:0", "every:1", "bogus"])
def test_eval_bad_protocols(tmp_path, memory_export, eval_video, protocol, capsys):
    """every:1 would leave no frame to score."""
    out = tmp_path / "r.json"
    assert evaluate("--model", memory_export, "--videos", eval_video, "--json", out, "--size",
                    SIZE, "--keyframes", protocol) == 1
    captured = capsys.readouterr()
    assert "tricolor-eval: error:" in captured.err
    assert f"--keyframes {protocol!r}: expected none, first or every:N with N >= 2" in \
        captured.err
    assert not out.exists() and captured.out == ""  # nothing scored


def test_eval_keyframes_for_a_model_without_memory_are_pasted_in(tmp_path, grey_export,
                                                                  eval_video, capsys):
    """A control under the keyframe protocol: the given frames are in its output (so its
    temporal scores jump out of them as a memory model's do) but nothing carries them on;
    the protocol says so. Its other frames are its automatic frames."""
    auto, _ = eval_report(tmp_path, grey_export, eval_video, "none", capsys)
    first, _ = eval_report(tmp_path, grey_export, eval_video, "first", capsys)
    assert "no colour memory: the given frames are pasted, not carried on" in first["protocol"]
    given, plain = first["videos"][0], auto["videos"][0]
    assert given["keyframes"] == [0, 6]
    for t in range(12):
        if t not in (0, 6):
            assert given["psnr_by_frame"]["model"][t] == pytest.approx(
                plain["psnr_by_frame"]["model"][t], rel=1e-9), t
    assert given["methods"]["model"]["warp"] != plain["methods"]["model"]["warp"]


def test_eval_a_video_with_no_frame_left_to_score_is_a_named_failure(tmp_path, memory_export,
                                                                     capsys):
    """One frame, given: nothing to score. The video is named as failed; the others are
    scored and the exit status is 1."""
    single = scene_video(tmp_path / "single.mp4", [1], width=64, height=48)
    other = scene_video(tmp_path / "other.mp4", [3], width=64, height=48)
    out = tmp_path / "r.json"
    assert evaluate("--model", memory_export, "--videos", single, other, "--json", out,
                    "--size", SIZE, "--keyframes", "first") == 1
    err = capsys.readouterr().err
    assert f"{single}: no frame left to score" in err
    report = json.loads(out.read_text())
    assert [f["path"] for f in report["failures"]] == [str(single)]
    assert [v["path"] for v in report["videos"]] == [str(other)]
