"""FASTA reader: sequences as byte tokens, headers dropped, records separated by one newline.

Conventions:
- Header lines (optional leading spaces/tabs, then '>') are dropped with their line ending.
- All whitespace inside sequences (LF, CRLF, CR, spaces, tabs, blank lines) is dropped.
- Every other byte is kept as is: case (lowercase soft-masking), IUPAC codes (N, R, Y, ...),
  gaps ('-'), stop codons ('*').
- Records are joined with one separator byte, b"\\n" (value 10, `RECORD_SEPARATOR`), so record
  boundaries stay visible to the model; records with an empty sequence are skipped. Text before
  the first header counts as a record of its own.
"""

from __future__ import annotations

import re

import numpy as np

from sh2_jax.data.bytes import maybe_gunzip

RECORD_SEPARATOR = b"\n"
_HEADER_LINE = re.compile(rb"^[ \t]*>[^\n]*", re.MULTILINE)
_WHITESPACE = b" \t\r\n\v\f"


def parse_fasta(text: bytes) -> np.ndarray:
  """Parses (decompressed) FASTA content.

  Args:
    text: the FASTA file content.

  Returns:
    [N] uint8 sequence bytes, records joined by RECORD_SEPARATOR; empty if no record has any
    sequence.
  """
  pieces = _HEADER_LINE.split(text.replace(b"\r", b"\n"))  # CRLF and CR-only endings.
  records = [p.translate(None, _WHITESPACE) for p in pieces]
  joined = RECORD_SEPARATOR.join(r for r in records if r)
  return np.frombuffer(joined, dtype=np.uint8).copy()


def read_fasta(path: str) -> np.ndarray:
  """Reads a FASTA or gzipped FASTA file (gzip detected by magic bytes, not by extension).

  Args:
    path: .fa/.fasta/.fna/... file, optionally gzip-compressed.

  Returns:
    [N] uint8 sequence bytes, records joined by b"\\n" (see the module docstring).
  """
  with open(path, "rb") as f:
    return parse_fasta(maybe_gunzip(f.read()))
