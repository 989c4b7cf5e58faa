"""What is alive at a compiled program's memory peak, from XLA's own dump (no run needed).

`compile_with_dump` compiles a lowered jax program with XLA's dump options; `peak_buffers` reads
the dump's live-range file ("Live ranges at T (peak)": every buffer alive at the heap-simulated
peak) and the optimized HLO text (each buffer's shape and JAX op name), and groups the buffers
by (shape, JAX op). Works on every backend, also when the program does not fit the device.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import tempfile
from typing import Any, Iterator

_PEAK_HEADER = re.compile(r"^\s*Live ranges at \d+ \(peak\):")
_PEAK_LINE = re.compile(r"^\s*(\S+?)\{([\d,]*)\}: (\d+) bytes")
_HLO_LINE = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) [\w\-]+\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def compiled_bytes(compiled: Any) -> int | None:
  """Device bytes a compiled program needs by XLA's buffer assignment: its arguments, its
  outputs not written over a donated argument, and its temporaries; None where the backend
  gives no memory analysis."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - some backends have no analysis
    return None
  if m is None:
    return None
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)


def compile_with_dump(lowered: Any, module: str = "jit_step") -> tuple[Any, list[dict[str, Any]]]:
  """Compiles `lowered` (a jax Lowered) with XLA's dump on; returns the compiled program and
  the buffers alive at its memory peak (`peak_buffers`). The dump is deleted afterwards."""
  dump = tempfile.mkdtemp(prefix="sh2_xla_dump_")
  try:
    with _persistent_cache_off():
      compiled = lowered.compile(compiler_options={
          "xla_dump_to": dump, "xla_dump_hlo_as_text": True,
          "xla_dump_hlo_module_re": re.escape(module)})
    return compiled, peak_buffers(dump, module)
  finally:
    shutil.rmtree(dump, ignore_errors=True)


@contextlib.contextmanager
def _persistent_cache_off() -> Iterator[None]:
  """Compiles inside this context skip JAX's persistent compilation cache
  (jax_compilation_cache_dir): its key ignores the dump options, so a program it already holds
  would load without being compiled, and XLA would write no dump. JAX has no public per-call
  switch once the cache is in use; without the private hook this is a no-op."""
  try:
    from jax._src import compilation_cache  # noqa: PLC0415
    original = compilation_cache.is_cache_used
  except (ImportError, AttributeError):
    yield
    return
  compilation_cache.is_cache_used = lambda backend: False
  try:
    yield
  finally:
    compilation_cache.is_cache_used = original


def _tuple_elements(shape: str) -> list[str]:
  """The top-level elements of an HLO tuple shape "(f32[2]{0}, (s32[], ...), ...)"."""
  body = re.sub(r"/\*[^*]*\*/", "", shape.strip())[1:-1]
  elements, depth, start = [], 0, 0
  for i, char in enumerate(body):
    if char in "([{":
      depth += 1
    elif char in ")]}":
      depth -= 1
    elif char == "," and depth == 0:
      elements.append(body[start:i].strip())
      start = i + 1
  elements.append(body[start:].strip())
  return elements


def _shape_at(shape: str, index: str) -> str:
  """The (sub)shape of an HLO value at a tuple index "1,0" ("" = the value itself), without
  its layout."""
  for i in [int(p) for p in index.split(",") if p]:
    if not shape.startswith("("):
      break
    elements = _tuple_elements(shape)
    if i >= len(elements):
      break
    shape = elements[i]
  return re.sub(r"\{[\d,]*\}", "", shape)


def _latest(dump_dir: str, module: str, suffix: str) -> str | None:
  paths = [p for p in glob.glob(os.path.join(dump_dir, f"module_*.{module}.*{suffix}"))
           if "before_optimizations" not in p]
  return max(paths, key=os.path.getmtime) if paths else None


def peak_buffers(dump_dir: str, module: str = "jit_step") -> list[dict[str, Any]]:
  """Buffers alive at the peak of `module`'s dumped program, grouped by (shape, JAX op) and
  sorted by total bytes: dicts with bytes (the group's total), count, shape, op (the JAX op
  name, or the HLO instruction where XLA has none) and label (one HLO instruction).
  [] if the dump has no live-range file (XLA_FLAGS or the backend did not write one)."""
  live_range = _latest(dump_dir, module, "after_optimizations-live-range.txt")
  hlo = _latest(dump_dir, module, "after_optimizations.txt")
  if live_range is None or hlo is None:
    return []
  alive: list[tuple[str, str, int]] = []
  with open(live_range) as f:
    inside = False
    for line in f:
      if _PEAK_HEADER.match(line):
        inside = True
      elif inside:
        match = _PEAK_LINE.match(line)
        if not match:
          break
        alive.append((match.group(1), match.group(2), int(match.group(3))))
  names = {name for name, _, _ in alive}
  info: dict[str, tuple[str, str]] = {}
  with open(hlo) as f:
    for line in f:
      match = _HLO_LINE.match(line)
      if match and match.group(1) in names and match.group(1) not in info:
        op = _OP_NAME.search(line)
        info[match.group(1)] = (match.group(2), op.group(1) if op else "")
  groups: dict[tuple[str, str], dict[str, Any]] = {}
  for name, index, size in alive:
    shape, op = info.get(name, ("?", ""))
    key = (_shape_at(shape, index), op or name)
    group = groups.setdefault(key, {"bytes": 0, "count": 0, "shape": key[0], "op": key[1],
                                    "label": name + (f"{{{index}}}" if index else "")})
    group["bytes"] += size
    group["count"] += 1
  return sorted(groups.values(), key=lambda g: -g["bytes"])
