"""Command-line values the benchmarks share: sequence lengths as token counts."""

from __future__ import annotations

import argparse

_SUFFIXES = {"k": 1024, "m": 1024 * 1024}


def token_count(text: str) -> int:
  """"4096" -> 4096, "8K" / "8k" -> 8192, "1M" -> 1048576; ValueError unless a positive count."""
  text = text.strip()
  scale = _SUFFIXES.get(text[-1:].lower(), 1)
  digits = text[:-1] if scale > 1 else text
  if not digits.isdigit() or int(digits) == 0:
    raise ValueError(f"{text!r} is not a positive token count")
  return int(digits) * scale


def parse_lengths(parser: argparse.ArgumentParser, flag: str, text: str,
                  allow_empty: bool = False) -> list[int]:
  """The comma-separated token counts of `flag`; a bad value exits through parser.error with
  one line that names it and shows the accepted form."""
  try:
    lengths = [token_count(item) for item in text.split(",") if item.strip()]
  except ValueError as error:
    parser.error(f"{flag} {text}: {error}; give comma-separated token counts such as 4096,8K,1M")
  if not lengths and not allow_empty:
    parser.error(f"{flag} is empty; give comma-separated token counts such as 4096,8K,1M")
  return lengths
