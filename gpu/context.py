"""What every stage of `make gpu-check` shares: the repository's paths, the `Context` a stage
gets (where to work, the stage shards, the device) and records its checks in, and `Skip`."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"


class Skip(Exception):
    """The stage cannot run here (a package the host lacks): reported as skipped."""


class Context:
    """What a stage gets: where to work, the stage shards, the device; collects checks."""

    def __init__(self, work: Path, shards: Path, device: str = "cuda", tiny: bool = False):
        self.work, self.shards, self.device, self.tiny = work, shards, device, tiny
        self.checks: list[dict] = []

    def check(self, name: str, ok: bool, detail: object = "") -> bool:
        self.checks.append({"name": name, "ok": bool(ok), "detail": str(detail)})
        print(f"check {'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)
        return bool(ok)


def endless(loader):
    """Batches of `loader`, epoch after epoch."""
    while True:
        yield from loader
