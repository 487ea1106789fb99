"""Whether one sample is what the loaders assume: the one check behind `tricolor-shards verify`,
the loaders' start-up scan (`trainer.data.samples`) and the good-samples index they read.

A sample's members are read where they lie: `(buffer, offset, size)` per extension, the
buffer a mapped tar (the scan) or the member's own bytes (`verify`, the webdataset reader).
What is checked, in this order, each failure one reason "<kind> (<detail>)":

- the members are exactly the expected ones ("missing component", "unexpected member");
- each image member starts with its format's signature, a JPEG also ends with its end marker
  ("undecodable JPEG", "undecodable PNG"): a JPEG stored in a flow slot decodes, but as lossy
  flow, so the slot's format is checked, not only that the bytes decode;
- the `json` member is an object with the fields the build writes ("unreadable json");
- every image's size, read from its header, is the sample's (the json's width and height),
  and that size is one the manifest lists for the split ("wrong size"): a member of another
  size fails the crop (DALI) or the stack (webdataset) mid-run;
- every member's CRC-32 is the one the build recorded in the json ("checksum mismatch");
  samples built before checksums were recorded pass without it (the result is "" then);
- with `decode=True` (`verify`, and the index it writes), every image decodes whole
  ("undecodable ..."): what a damaged sample without checksums can only show by decoding.
"""

from __future__ import annotations

import io
import json
import zlib
from collections.abc import Iterable

from PIL import Image

FRAME_MEMBERS = ("prev.jpg", "cur.jpg", "next.jpg")  # frames t-1, t, t+1
SAMPLE_FIELDS = ("source", "frame", "fps", "scene", "width", "height")
FORMATS = {"jpg": "JPEG", "png": "PNG"}  # by the member's extension: what its slot holds
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic): they hold the size
SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}

Blob = tuple  # (buffer, offset, size): a member's bytes are buffer[offset : offset + size]


def blobs(members: dict[str, bytes]) -> dict[str, Blob]:
    """Members held as their own bytes, in the form the checks read."""
    return {ext: (data, 0, len(data)) for ext, data in members.items()}


def read(blob: Blob, start: int = 0, stop: int | None = None) -> bytes:
    buffer, offset, size = blob
    stop = size if stop is None else min(stop, size)
    return bytes(buffer[offset + start : offset + stop])


def image_kind(ext: str) -> str | None:
    """The format a member of this extension holds ("JPEG", "PNG"), None for the json."""
    return FORMATS.get(ext.rsplit(".", 1)[-1])


def signature(blob: Blob) -> str | None:
    """The format the bytes start like, whatever their extension says."""
    head = read(blob, 0, 8)
    if head.startswith(b"\xff\xd8"):
        return "JPEG"
    if head == PNG_SIGNATURE:
        return "PNG"
    return None


def jpeg_size(blob: Blob) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame header, walking its segments; None when
    none comes before the image data."""
    pos, size = 2, blob[2]
    while pos + 4 <= size:
        marker = read(blob, pos, pos + 4)
        if marker[0] != 0xFF:
            return None
        kind = marker[1]
        if kind == 0xFF:  # fill byte
            pos += 1
            continue
        if kind in SOF_MARKERS:
            header = read(blob, pos + 5, pos + 9)
            if len(header) < 4:
                return None
            return int.from_bytes(header[2:4], "big"), int.from_bytes(header[0:2], "big")
        if kind == 0xDA or kind == 0xD9:  # image data or its end: no frame header before it
            return None
        if 0xD0 <= kind <= 0xD7 or kind == 0x01:  # markers without a length
            pos += 2
            continue
        pos += 2 + int.from_bytes(marker[2:4], "big")
    return None


def png_size(blob: Blob) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, the first after the signature."""
    header = read(blob, 8, 24)
    if len(header) < 16 or header[4:8] != b"IHDR":
        return None
    return int.from_bytes(header[8:12], "big"), int.from_bytes(header[12:16], "big")


def header_size(blob: Blob, kind: str) -> tuple[int, int] | None:
    return jpeg_size(blob) if kind == "JPEG" else png_size(blob)


def format_problem(ext: str, blob: Blob) -> str | None:
    """Why `blob` is not the kind of image its slot `ext` holds, or None."""
    kind = image_kind(ext)
    found = signature(blob)
    if found != kind:
        what = f"{found} data" if found else f"no {kind} signature"
        return f"undecodable {kind} ({ext}: {what}, expected {kind})"
    if kind == "JPEG" and b"\xff\xd9" not in read(blob, max(0, blob[2] - 64)):
        # no end marker near the end: cut short, or followed by foreign bytes
        return f"undecodable JPEG ({ext}: no JPEG end marker)"
    return None


def sample_meta(blob: Blob | None) -> tuple[dict | None, str | None]:
    """The sample's json member as a dict, or why it cannot be used."""
    if blob is None:
        return None, "missing component json"
    try:
        meta = json.loads(read(blob))
    except ValueError as e:  # not JSON, or not UTF-8
        return None, f"unreadable json ({e})"
    if not isinstance(meta, dict):
        return None, "unreadable json (not an object)"
    missing = [f for f in SAMPLE_FIELDS if f not in meta]
    if missing:
        return None, f"unreadable json (missing fields {', '.join(missing)})"
    w, h = meta["width"], meta["height"]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (w, h)):
        return None, f"unreadable json (width {w!r}, height {h!r}: expected positive integers)"
    return meta, None


def crc_problem(members: dict[str, Blob], meta: dict, exts: Iterable[str]) -> str | None:
    """A member of `exts` whose CRC-32 is not the one the json records, or None; "" when the
    sample records no checksums (built before they were)."""
    recorded = meta.get("crc32")
    if recorded is None:
        return ""
    for ext in exts:
        value = recorded.get(ext) if isinstance(recorded, dict) else None
        if not isinstance(value, int) or isinstance(value, bool):
            return f"checksum mismatch (the json records no CRC-32 of {ext})"
        crc = zlib.crc32(read(members[ext]))
        if crc != value:
            return f"checksum mismatch ({ext}: CRC-32 {crc:08x}, recorded {value:08x})"
    return None


def decode_problem(ext: str, data: bytes, size: tuple[int, int]) -> str | None:
    """Why these bytes do not decode whole to an image of `size`, or None."""
    kind = image_kind(ext)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # every pixel: a cut or damaged image fails here
            got = image.size
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad data
        return f"undecodable {kind} ({ext}: {e})"
    if got != size:
        return (f"wrong size ({ext}: decodes to {got[0]}x{got[1]}, the json says "
                f"{size[0]}x{size[1]})")
    return None


def _size_text(sizes) -> str:
    return ", ".join(f"{w}x{h}" for w, h in sorted(sizes)) or "none"


def sample_problem(members: dict[str, Blob], expected: Iterable[str], sizes=None,
                   crc: bool = True, decode: bool = False) -> str | None:
    """Why this sample cannot be trained on (module doc), None when it can, "" when it can
    but records no checksums. `expected`: the member extensions a sample holds (the
    manifest's: frames, flow when built with it, json); `sizes`: the frame sizes the
    manifest lists for the split (None: not checked); `crc=False`: the checksums are known
    to match (an earlier scan of the unchanged shard)."""
    expected = list(expected)
    missing = [m for m in expected if m not in members]
    if missing:
        return f"missing component {', '.join(missing)}"
    extra = sorted(set(members) - set(expected))
    if extra:
        return f"unexpected member {', '.join(extra)}"
    images = [m for m in expected if image_kind(m)]
    for ext in images:
        if problem := format_problem(ext, members[ext]):
            return problem
    meta, problem = sample_meta(members["json"])
    if problem:
        return problem
    size = (meta["width"], meta["height"])
    if sizes is not None and size not in sizes:
        return (f"wrong size (the json says {size[0]}x{size[1]}, the manifest's frame sizes "
                f"are {_size_text(sizes)})")
    for ext in images:
        got = header_size(members[ext], image_kind(ext))
        if got is None:
            return f"undecodable {image_kind(ext)} ({ext}: no readable size in its header)"
        if got != size:
            return (f"wrong size ({ext}: {got[0]}x{got[1]}, the json says "
                    f"{size[0]}x{size[1]})")
    checked = crc_problem(members, meta, images) if crc else None
    if checked:
        return checked
    if decode:
        for ext in images:
            if problem := decode_problem(ext, read(members[ext]), size):
                return problem
    return checked
