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

from parity_jax.bundles.compare import compare_bundles
from parity_jax.bundles.diff import Breach
from parity_jax.bundles.format import FORMAT, BundleReader, BundleWriter, StageBundle, load_bundle, save_bundle
from parity_jax.bundles.logits import LogitsStats, logits_stats
from parity_jax.bundles.bundle_report import REPORT_SCHEMA, BundleReport, SourceInfo, StageRow, load_report
from parity_jax.bundles.tolerance import (
    BUILTIN_PROFILES,
    PROFILE_SCHEMA,
    Profile,
    ToleranceRule,
    builtin_profile,
    load_profile_json,
    profile_from_dict,
    resolve_profile,
)
from parity_jax.bundles.verdict import StageError, Verdict, analyse

__all__ = [
    "BUILTIN_PROFILES",
    "FORMAT",
    "PROFILE_SCHEMA",
    "REPORT_SCHEMA",
    "Breach",
    "BundleReader",
    "BundleReport",
    "BundleWriter",
    "LogitsStats",
    "Profile",
    "SourceInfo",
    "StageBundle",
    "StageError",
    "StageRow",
    "ToleranceRule",
    "Verdict",
    "analyse",
    "builtin_profile",
    "compare_bundles",
    "load_bundle",
    "load_profile_json",
    "load_report",
    "logits_stats",
    "profile_from_dict",
    "resolve_profile",
    "save_bundle",
]
