"""Stage bundles and their comparison: the pipeline behind forward parity and ``compare_stages``.

A *stage bundle* is an ordered mapping stage name -> array in one safetensors
file, with provenance (:mod:`.format`). Two bundles are compared stage by stage
in execution order (:mod:`.compare`): each stage's statistics (:mod:`.diff`,
:mod:`parity_jax.arraydiff`; logits get :mod:`.logits`) against a tolerance
profile (:mod:`.tolerance`), then the verdict names the first divergent stage,
a jump or accumulated drift (:mod:`.verdict`, over the Qwen stage graph of
:mod:`.qwen_graph`). The result is a :class:`BundleReport` (:mod:`.bundle_report`),
rendered as text/HTML (:mod:`.render`) or a PNG (:mod:`.plot`).

::

  report = parity_jax.bundles.compare_bundles("golden.safetensors", "ours.safetensors", profile="f32")
  report.first_divergent, report.passed, report.text(), report.write_json("r.json"), report.plot("r.png")
"""

from __future__ import annotations

import importlib

# Imported on first use (PEP 562), so that ``from parity_jax.bundles import BUILTIN_PROFILES`` -- a tool's flag
# definitions -- reads the tolerance table without importing numpy, ml_dtypes or the comparison code.
_HOME = {
    "compare_bundles": "compare",
    "Breach": "diff",
    "FORMAT": "format",
    "BundleReader": "format",
    "BundleWriter": "format",
    "StageBundle": "format",
    "load_bundle": "format",
    "save_bundle": "format",
    "LogitsStats": "logits",
    "logits_stats": "logits",
    "REPORT_SCHEMA": "bundle_report",
    "BundleReport": "bundle_report",
    "SourceInfo": "bundle_report",
    "StageRow": "bundle_report",
    "load_report": "bundle_report",
    "BUILTIN_PROFILES": "tolerance",
    "PROFILE_SCHEMA": "tolerance",
    "Profile": "tolerance",
    "ToleranceRule": "tolerance",
    "builtin_profile": "tolerance",
    "load_profile_json": "tolerance",
    "profile_from_dict": "tolerance",
    "resolve_profile": "tolerance",
    "StageError": "verdict",
    "Verdict": "verdict",
    "analyse": "verdict",
}

__all__ = sorted(_HOME)


def __getattr__(name: str):
  home = _HOME.get(name)
  if home is None:
    raise AttributeError(f"module 'parity_jax.bundles' has no attribute {name!r}")
  value = getattr(importlib.import_module(f"parity_jax.bundles.{home}"), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
