"""Checkpoints, before every save and at every load: whether a checkpoint can be trusted, its
bytes (`verify`) and its values (`nonfinite_parts`).

Bytes. `torch.save` writes a zip archive whose every member (the pickle, each tensor's storage,
the version records) carries a CRC32 of its data, which `torch.load` never checks: a flipped bit
on disk or in a copy loads without a word. `verify` checks every member's CRC32 against its
bytes. The CRC was chosen over a digest recorded at save time because it covers every zip
checkpoint ever written, cspx's older ones and timm's released weights included, and because
it is the faster of the two here (zlib's CRC32 about 0.9 GB/s against SHA-256's 0.5 GB/s on one
core; `scripts/benchmark.py checkpoint` measures `verify`). A CRC32 detects every error burst of
up to 32 bits, and misses a random corruption with probability 2^-32. The zip's own structure
(the central directory, each member's local header) is checked on the way. Not covered: the
legacy (pre-zip, PyTorch < 1.6) pickle format, which carries no checksum (`verify` says so), and
the padding between members, which holds no data.

Values. `nonfinite_parts` names the parts of a state that hold a NaN or an infinity, with one
device reduction per part and one read to the host: the last line of defence before a save
(cspx.divergence), and a check on every checkpoint `--resume auto` considers.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
import zipfile
import zlib
from typing import Any, Dict, List, Optional, Tuple

import torch

from cspx.checkpoint.layout import leaves
from cspx.errors import CspxError

LOCAL_HEADER = struct.Struct("<4s22xHH")   # signature, (22 bytes), name length, extra length
CHUNK = 64 << 20  # bytes per zlib.crc32 call (it releases the GIL for the duration)
LEGACY = "legacy PyTorch format (before 1.6): carries no checksum, not verified"


class CorruptCheckpoint(CspxError):
    """A checkpoint whose bytes changed after it was written (a CRC or header mismatch): `why`
    says where."""

    def __init__(self, path: str, why: str):
        super().__init__(f"{path}: corrupted: {why}: its bytes changed after it was written (a "
                         f"flipped bit on disk or in a copy), so it cannot be trusted")


def verify(path: str) -> Optional[str]:
    """Check the CRC32 of every member of the zip checkpoint at `path`. Returns None when every
    member matched, or a note when the file carries no checksum (LEGACY); raises
    CorruptCheckpoint naming the file and the member when one does not match. A file that is
    not a readable zip archive (truncated, not a checkpoint) is left to the loader, whose
    message says what it is."""
    try:
        f = open(path, "rb")
    except OSError:
        return None  # the loader names the missing or unreadable file
    with f:
        head = f.read(4)
        if head[:1] == b"\x80":       # a pickle protocol byte: the legacy format
            return LEGACY
        if head != b"PK\x03\x04":
            return None
        try:
            members = zipfile.ZipFile(f).infolist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return None  # no central directory: truncated (the loader says so)
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                for info in members:
                    _check_member(path, f, view, size, info)
            finally:
                view.release()
    return None


def _check_member(path: str, f, view: memoryview, size: int, info: zipfile.ZipInfo) -> None:
    at = info.header_offset
    if at + LOCAL_HEADER.size > size:
        raise CorruptCheckpoint(path, f"member {info.filename!r} starts past the end of the file")
    sig, name_len, extra_len = LOCAL_HEADER.unpack_from(view, at)
    name = bytes(view[at + LOCAL_HEADER.size:at + LOCAL_HEADER.size + name_len])
    if sig != b"PK\x03\x04" or name != info.orig_filename.encode("utf-8"):
        raise CorruptCheckpoint(path, f"the header of member {info.filename!r} is damaged")
    start = at + LOCAL_HEADER.size + name_len + extra_len
    if info.compress_type != zipfile.ZIP_STORED:  # torch stores; another writer may deflate
        try:
            with zipfile.ZipFile(f).open(info) as m:
                while m.read(CHUNK):
                    pass
        except (zipfile.BadZipFile, zlib.error, OSError) as e:
            raise CorruptCheckpoint(path, f"member {info.filename!r}: {e}") from None
        return
    end = start + info.compress_size
    if end > size:
        raise CorruptCheckpoint(path, f"member {info.filename!r} ends past the end of the file")
    crc = 0
    for a in range(start, end, CHUNK):
        crc = zlib.crc32(view[a:min(a + CHUNK, end)], crc)
    if crc != info.CRC:
        raise CorruptCheckpoint(path, f"member {info.filename!r} fails its CRC32 check "
                      f"(recorded {info.CRC:08x}, found {crc:08x})")


# ----- values -------------------------------------------------------------------------------------
def nonfinite_parts(state: Dict[str, Any]) -> List[str]:
    """The top-level keys of `state` whose floating-point tensors or Python floats hold a NaN or
    an infinity. On the tensors' device, with one read to the host per device (one in a run):
    each tensor's L2 norm (torch's multi-tensor kernel, the fastest full reduction here; a NaN or
    an infinity makes it non-finite). A norm that overflowed (elements beyond about 1e19) is
    then checked element by element, so only a real NaN or infinity counts."""
    bad = set()
    groups: Dict[Any, List[Tuple[str, torch.Tensor]]] = {}  # (device, dtype) -> [(key, tensor)]
    for key, part in state.items():
        for x in leaves(part):
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel():
                groups.setdefault((x.device, x.dtype), []).append((key, x.detach()))
            elif isinstance(x, float) and not math.isfinite(x):
                bad.add(key)
    flags: Dict[torch.device, List[Tuple[List[Tuple[str, torch.Tensor]], torch.Tensor]]] = {}
    for (device, _), items in groups.items():
        norms = torch.stack(torch._foreach_norm([t for _, t in items], 2))
        flags.setdefault(device, []).append((items, torch.isfinite(norms)))
    for found in flags.values():
        ok = torch.cat([f for _, f in found]).tolist()
        suspects = [kt for items, _ in found for kt in items]
        suspects = [kt for kt, good in zip(suspects, ok) if not good]
        if suspects:  # a NaN or an infinity, or a norm that overflowed: look at the elements
            exact = torch.stack([torch.isfinite(t).all() for _, t in suspects]).tolist()
            bad.update(k for (k, _), good in zip(suspects, exact) if not good)
    return [k for k in state if k in bad]
