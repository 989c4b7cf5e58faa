"""Markdown output of the experiment scripts."""

from __future__ import annotations

import os


def emit(lines: list[str], out: str | None) -> str:
  """Joins `lines` into a markdown document, prints it, writes it to `out` when given (making
  its folder), and returns it."""
  text = "\n".join(lines) + "\n"
  print(text)
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      f.write(text)
  return text
