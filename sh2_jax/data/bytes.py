"""Raw byte reader: any text or binary file as uint8 tokens (gzip decompressed by magic bytes)."""

from __future__ import annotations

import gzip

import numpy as np

GZIP_MAGIC = b"\x1f\x8b"


def maybe_gunzip(raw: bytes) -> bytes:
  """Decompresses gzip data (detected by its magic bytes, any extension); else returns raw."""
  if raw[:2] == GZIP_MAGIC:
    return gzip.decompress(raw)
  return raw


def read_raw(path: str) -> bytes:
  """The content of a file, gzip transparently decompressed."""
  with open(path, "rb") as f:
    return maybe_gunzip(f.read())


def read_bytes(path: str) -> np.ndarray:
  """Reads a file as byte tokens.

  Args:
    path: any file; gzip content (magic bytes 1f 8b) is decompressed first.

  Returns:
    [N] uint8, one token per byte of the (decompressed) content, writable.
  """
  return np.frombuffer(read_raw(path), dtype=np.uint8).copy()
