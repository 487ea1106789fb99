"""Scene-cut detection with PySceneDetect's content detector, fed frame by frame."""

from __future__ import annotations

import numpy as np
from scenedetect.common import FrameTimecode
from scenedetect.detectors import ContentDetector


class SceneCuts:
    """Assigns a scene id to each frame as the frames stream by.

    `min_scene_len=0` disables PySceneDetect's flash filter: a missed cut would put a
    triplet across two shots, while an extra cut only costs the two triplets around it.
    """

    def __init__(self, fps: float, threshold: float = 27.0):
        self._detector = ContentDetector(threshold=threshold, min_scene_len=0)
        self._fps = fps if fps > 0 else 25.0
        self._frame = 0
        self.scene = 0

    def push(self, rgb: np.ndarray) -> int:
        """Scene id of this frame (the detector expects BGR)."""
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        cuts = self._detector.process_frame(FrameTimecode(self._frame, self._fps), bgr)
        # With the flash filter off a cut is reported at the frame that starts the new scene.
        self.scene += sum(1 for tc in cuts if tc.frame_num == self._frame)
        self._frame += 1
        return self.scene
