"""SVF files: components, offsets, stage-bundle keys and the run report.

All tensors travel as safetensors, named like the Python process names them:

* components: ``<source_name>.U``, ``<source_name>.S``, ``<source_name>.V`` in
  one file (``*svf_components.safetensors``);
* offsets: ``<source_name>`` in one file (``*svf_scale_offsets.safetensors``);
* the sample stage bundle: ``stage.<stage>``;
* the all-selected stage bundle: ``tensor.<safe_source_name>.<stage>``.

The suffix match lets ``--components_dir`` point at the Python process's own
output directory (``trinity_svf_components.safetensors`` ...) as well as at
ours. The report JSON (``svf_report.json``) names the bundles it belongs to,
relative to its own directory.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Mapping

import numpy as np
import safetensors

from parity_jax import bundles
from parity_jax.errors import UsageError, arg
from parity_jax.svf.core import LAYOUTS, validate_components
from parity_jax.svf.hashing import safe_source_name

__all__ = [
    "ALL_SELECTED_BUNDLE",
    "COMPONENTS_SUFFIX",
    "ComponentStore",
    "GoldenRun",
    "OFFSETS_SUFFIX",
    "REPORT_FORMAT",
    "REPORT_NAME",
    "SAMPLE_BUNDLE",
    "find_component_files",
    "load_golden",
    "read_columns",
    "sample_key",
    "tensor_key",
    "write_components",
]

COMPONENTS_SUFFIX = "svf_components.safetensors"
OFFSETS_SUFFIX = "svf_scale_offsets.safetensors"
SAMPLE_BUNDLE = "svf_stage_debug.safetensors"
ALL_SELECTED_BUNDLE = "svf_all_selected_stage_debug.safetensors"
REPORT_NAME = "svf_report.json"
REPORT_FORMAT = "parity_jax.svf_report/1"


def sample_key(stage: str) -> str:
  """Key of ``stage`` in the sample stage bundle."""
  return f"stage.{stage}"


def tensor_key(source_name: str, stage: str) -> str:
  """Key of ``stage`` of ``source_name`` in the all-selected stage bundle."""
  return f"tensor.{safe_source_name(source_name)}.{stage}"


def _one_file(directory: str, suffix: str, what: str) -> str:
  if not os.path.isdir(directory):
    raise UsageError(f"no such directory: {directory}")
  hits = sorted(glob.glob(os.path.join(glob.escape(directory), f"*{suffix}")))
  if not hits:
    raise UsageError(f"no {what} file (*{suffix}) in {directory}")
  if len(hits) > 1:
    raise UsageError(f"more than one {what} file in {directory}: {', '.join(os.path.basename(h) for h in hits)}")
  return hits[0]


def find_component_files(components_dir: str) -> tuple[str, str]:
  """``(components_path, offsets_path)`` in ``components_dir`` (exactly one of each)."""
  return _one_file(components_dir, COMPONENTS_SUFFIX, "components"), _one_file(
      components_dir, OFFSETS_SUFFIX, "scale offsets"
  )


class ComponentStore:
  """Lazy access to a components file and its offsets file.

  Validates on open that every ``<name>.U`` has ``.S``, ``.V`` and an offsets
  entry with consistent shapes for ``layout``, and that no two names collide
  after :func:`safe_source_name`. Rows of ``U`` are read on demand, so a
  151936 x 1024 embedding never has to be loaded whole.
  """

  def __init__(self, components_path: str, offsets_path: str, layout: str = "torch_v"):
    if layout not in LAYOUTS:
      raise UsageError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    self.layout = layout
    self.components_path = components_path
    self.offsets_path = offsets_path
    self._c = bundles.BundleReader(components_path)
    self._o = bundles.BundleReader(offsets_path)
    keys = set(self._c.names)
    names = [k[:-2] for k in self._c.names if k.endswith(".U")]
    if not names:
      raise UsageError(f"{components_path}: no '<name>.U' tensors")
    safe_seen: dict[str, str] = {}
    self._dims: dict[str, tuple[int, int, int]] = {}
    for name in names:
      for part in ("S", "V"):
        if f"{name}.{part}" not in keys:
          raise UsageError(f"{components_path}: {name}.U has no {name}.{part}")
      if name not in self._o:
        raise UsageError(f"{offsets_path}: no scale offsets for {name}")
      self._dims[name] = validate_components(
          self._c.shape(f"{name}.U"),
          self._c.shape(f"{name}.S"),
          self._c.shape(f"{name}.V"),
          self._o.shape(name),
          layout,
          name,
      )
      safe = safe_source_name(name)
      if safe in safe_seen:
        raise UsageError(f"source names {safe_seen[safe]!r} and {name!r} collide as {safe!r}")
      safe_seen[safe] = name
    self.names: list[str] = names

  def __enter__(self) -> "ComponentStore":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    self._c.close()
    self._o.close()

  def _check(self, name: str) -> None:
    if name not in self._dims:
      raise UsageError(f"{self.components_path}: no components for {name!r}")

  def dims(self, name: str) -> tuple[int, int, int]:
    """``(m, n, k)``: the rebuilt matrix is ``[m, n]``, the rank ``k``."""
    self._check(name)
    return self._dims[name]

  def u(self, name: str) -> np.ndarray:
    self._check(name)
    return self._c.get(f"{name}.U")

  def u_rows(self, name: str, start: int, stop: int) -> np.ndarray:
    """Rows of U through a reader of their own, so the mapped pages leave with it."""
    self._check(name)
    with bundles.BundleReader(self.components_path) as r:
      return r.get_rows(f"{name}.U", start, stop)

  def s(self, name: str) -> np.ndarray:
    self._check(name)
    return self._c.get(f"{name}.S")

  def v(self, name: str) -> np.ndarray:
    """V as stored: ``[n, k]`` (torch_v) or ``[k, n]`` (vh)."""
    self._check(name)
    return self._c.get(f"{name}.V")

  def v_nk(self, name: str) -> np.ndarray:
    """V as ``[n, k]`` whatever the layout."""
    v = self.v(name)
    return v if self.layout == "torch_v" else np.ascontiguousarray(v.T)

  def offsets(self, name: str) -> np.ndarray:
    self._check(name)
    return self._o.get(name)


def write_components(
    directory: str,
    components: Mapping[str, tuple[Any, Any, Any]],
    offsets: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    prefix: str = "",
    overwrite: bool = False,
) -> list[str]:
  """Writes ``<prefix>svf_components.safetensors`` (and the offsets file when given).

  ``components``: name -> (U, S, V). Returns the paths written. Existing files
  are refused unless ``overwrite``.
  """
  os.makedirs(directory, exist_ok=True)
  out = []
  comp_path = os.path.join(directory, prefix + COMPONENTS_SUFFIX)
  items: dict[str, Any] = {}
  for name, (u, s, v) in components.items():
    items[f"{name}.U"], items[f"{name}.S"], items[f"{name}.V"] = u, s, v
  targets = [(comp_path, items)]
  if offsets is not None:
    targets.append((os.path.join(directory, prefix + OFFSETS_SUFFIX), dict(offsets)))
  for path, _ in targets:
    if os.path.exists(path) and not overwrite:
      raise UsageError(f"{path} exists; refusing to overwrite it (pass overwrite=True)")
  for path, data in targets:
    bundles.save_bundle(path, data, provenance)
    out.append(path)
  return out


def read_columns(path: str, key: str, start: int, stop: int) -> np.ndarray:
  """Columns ``start:stop`` of a 2-D tensor in a safetensors file, without loading the rest."""
  with safetensors.safe_open(path, framework="numpy") as f:
    return np.ascontiguousarray(f.get_slice(key)[:, start:stop])


@dataclasses.dataclass
class GoldenRun:
  """A Python (or oracle) run: its report and the stage bundles it names."""

  report_path: str
  report: dict[str, Any]
  sample_bundle: str | None
  all_selected_bundle: str | None
  components_dir: str | None  # where the report says the components are, if it does

  @property
  def base_dir(self) -> str:
    return os.path.dirname(os.path.abspath(self.report_path))

  @property
  def layout(self) -> str | None:
    return self.report.get("layout")

  @property
  def sample(self) -> dict[str, Any] | None:
    return self.report.get("sample")


def _resolve(base: str, path: str | None) -> str | None:
  if not path:
    return None
  return path if os.path.isabs(path) else os.path.join(base, path)


def load_golden(python_report: str | None = None, golden_dir: str | None = None) -> GoldenRun:
  """Reads the golden report (``--python_report`` or ``--golden_dir/svf_report.json``)."""
  if bool(python_report) == bool(golden_dir):
    raise UsageError(f"give exactly one of {arg('python_report')} and {arg('golden_dir')}")
  path = python_report or os.path.join(golden_dir, REPORT_NAME)
  if golden_dir and not os.path.isdir(golden_dir):
    raise UsageError(f"no such directory: {golden_dir}")
  if not os.path.isfile(path):
    raise UsageError(f"no such report: {path}")
  try:
    with open(path) as f:
      report = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise UsageError(f"cannot read report {path}: {e}") from None
  if not isinstance(report, dict):
    raise UsageError(f"{path}: report must be a JSON object")
  if not any(k in report for k in ("stage_debug", "sample", "tensors")):
    fmt = report.get("format")
    raise UsageError(f"{path} is not an SVF run report (format {fmt!r}; it has none of stage_debug, sample, tensors)")
  base = os.path.dirname(os.path.abspath(path))
  debug = report.get("stage_debug") or {}
  comps = report.get("components") or {}
  return GoldenRun(
      report_path=path,
      report=report,
      sample_bundle=_resolve(base, debug.get("stage_tensor_file")),
      all_selected_bundle=_resolve(base, debug.get("all_selected_stage_tensor_file")),
      components_dir=_resolve(base, comps.get("directory")) if comps.get("directory") is not None else None,
  )
