"""Many videos, one Slurm array (slurm/colorize.sbatch): which task colours which video.

    batch_plan(INPUTS, OUT_DIR)            every (input, output) pair, in a fixed order
    batch_task(INPUTS, OUT_DIR, K, N)      task K of N: its pairs, each "todo", "done" or
                                           "blocked" (`output_complete` decides)
    batch_task_main([INPUTS, OUT_DIR, K, N])  the same for the sbatch script, NUL-separated

Every task computes the same plan on its own, so the tasks need no shared state; a rerun of
the array skips the outputs that are complete, as `tricolor-colorize` writes an output under
its name only once it is complete.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import av

from inference.video_out import FRAMES_MARKER
from shards.video import VIDEO_SUFFIXES, VideoError, open_video


class BatchError(Exception):
    """A batch that cannot be planned (no inputs, two inputs for one output); says why."""


def output_complete(path: Path) -> bool:
    """Whether `path` holds a finished output of this tool. Outputs appear under their name
    only when complete (written under a temporary name, then renamed), so this is False only
    for something else put there: a video file that does not open as a video with frames, or
    a folder without the frames marker and frames. False when nothing is there."""
    path = Path(path)
    if path.is_dir():
        names = set(os.listdir(path))
        return FRAMES_MARKER in names and any(n.startswith("frame_") for n in names)
    if not path.is_file():
        return False
    try:
        container, stream = open_video(path)
        with container:
            return stream.frames > 0 or next(container.decode(stream), None) is not None
    except (VideoError, av.error.FFmpegError, OSError, UnicodeDecodeError):
        return False


def batch_plan(inputs: Path, out_dir: Path, suffix: str = ".mp4") -> list[tuple[Path, Path]]:
    """(input video, output path) for every video of `inputs`, in a fixed order that every
    array task computes alike. `inputs` is a folder (its videos, searched recursively;
    hidden files and anything under `out_dir` left out; the output keeps the path under the
    folder: IN/a/x.mov -> OUT/a/x.mp4) or a list file (one path per line, relative to the
    current folder; blank lines and # comments skipped; a file listed twice, in any
    spelling, taken once; OUT/<name>.mp4). Two different inputs for one output (the same name
    in two folders of a list, x.mov beside x.mp4) are refused (BatchError), naming them:
    nothing is silently overwritten or renamed."""
    inputs, out_dir = Path(inputs), Path(out_dir)
    out_abs = out_dir.resolve()
    pairs: list[tuple[Path, Path]] = []
    if inputs.is_dir():
        for p in sorted(inputs.rglob("*")):
            rel = p.relative_to(inputs)
            if (p.suffix.lower() not in VIDEO_SUFFIXES or p.is_dir()
                    or any(part.startswith(".") for part in rel.parts)
                    or p.resolve() == out_abs or out_abs in p.resolve().parents):
                continue
            pairs.append((p, out_dir / rel.with_suffix(suffix)))
    elif inputs.is_file():
        try:
            lines = inputs.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise BatchError(f"{inputs}: cannot read the list ({e})") from e
        seen: set[Path] = set()
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = Path(line)
            # One file under two spellings (relative and absolute, `..`, a symbolic link) is
            # listed twice: colorized once, under its first spelling.
            real = p.resolve()
            if real in seen:
                continue
            seen.add(real)
            pairs.append((p, out_dir / (p.stem + suffix)))
    else:
        raise BatchError(f"{inputs}: no such folder or list file")
    if not pairs:
        raise BatchError(f"{inputs}: no videos ({', '.join(sorted(VIDEO_SUFFIXES))})"
                         if inputs.is_dir() else f"{inputs}: lists no videos")
    by_output: dict[Path, list[Path]] = {}
    for src, out in pairs:
        by_output.setdefault(out, []).append(src)
    clashes = [(out, srcs) for out, srcs in by_output.items() if len(srcs) > 1]
    if clashes:
        shown = "; ".join(f"{' and '.join(map(str, srcs))} -> {out}" for out, srcs in clashes[:5])
        more = f" (and {len(clashes) - 5} more)" if len(clashes) > 5 else ""
        raise BatchError(f"{len(clashes)} output name(s) would be written by two inputs: "
                         f"{shown}{more}. Rename the inputs, or colorize them in separate "
                         "batches with separate output folders")
    return pairs


def batch_task(inputs: Path, out_dir: Path, task: int, tasks: int,
               suffix: str = ".mp4") -> list[tuple[str, Path, Path]]:
    """Array task `task` of `tasks`: videos task, task + tasks, ... of `batch_plan`, each as
    (status, input, output): "todo", "done" (a complete output exists: skipped) or
    "blocked" (something that is not a complete output is in the way: left alone)."""
    if not 0 <= task < tasks:
        raise BatchError(f"task {task} of {tasks}: not a task of this array")
    result = []
    for src, out in batch_plan(inputs, out_dir, suffix)[task::tasks]:
        if output_complete(out):
            status = "done"
        elif out.exists() or out.is_symlink():
            status = "blocked"
        else:
            status = "todo"
        result.append((status, src, out))
    return result


def batch_task_main(argv: list[str]) -> int:
    """`python -c 'from inference.colorize import batch_task_main as m; m([...])'` for
    slurm/colorize.sbatch (inference.colorize re-exports it): argv INPUTS OUT_DIR TASK TASKS;
    writes status, input and output of each video of the task to stdout, NUL-terminated;
    exit 2 with a message on a BatchError."""
    inputs, out_dir, task, tasks = argv
    try:
        rows = batch_task(Path(inputs), Path(out_dir), int(task), int(tasks))
    except BatchError as e:
        print(f"tricolor-colorize: error: {e}", file=sys.stderr)
        return 2
    for status, src, out in rows:
        sys.stdout.write(f"{status}\0{src}\0{out}\0")
    sys.stdout.flush()
    return 0
