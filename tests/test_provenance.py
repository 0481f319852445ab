"""parity_jax.provenance, where it is deterministic: versions from metadata, the provenance record, the CPU."""

import importlib.metadata
import os
import platform
import sys

import numpy as np
import pytest

from parity_jax import provenance


def test_package_versions_come_from_metadata_and_skip_what_is_absent():
  got = provenance.package_versions(("numpy", "ml_dtypes", "no-such-package-parity-jax"))
  assert got == {"numpy": np.__version__, "ml_dtypes": importlib.metadata.version("ml_dtypes")}
  default = provenance.package_versions()
  assert default["numpy"] == np.__version__ and default["parity_jax"] == importlib.metadata.version("parity_jax")
  assert "no-such-package-parity-jax" not in default


def test_default_provenance_fields():
  p = provenance.default_provenance("tests.x")
  assert p == {
      "producer": "tests.x",
      "python": platform.python_version(),
      "platform": platform.platform(),
      "versions": provenance.package_versions(),
  }
  assert p["python"] == ".".join(map(str, sys.version_info[:3]))


def test_default_provenance_seed_and_extras():
  assert "seed" not in provenance.default_provenance("p")
  assert provenance.default_provenance("p", seed=0)["seed"] == 0  # seed 0 is a seed
  assert provenance.default_provenance("p", seed=12)["seed"] == 12
  p = provenance.default_provenance("p", seed=3, inputs={"tokens": [1, 2]}, platform="tpu-vm")
  assert p["inputs"] == {"tokens": [1, 2]} and p["seed"] == 3 and p["producer"] == "p"
  assert p["platform"] == "tpu-vm"  # an extra wins over the default


def _first_processor() -> dict[str, str]:
  """The first processor block of /proc/cpuinfo, parsed here independently of the library."""
  out = {}
  with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
    for line in f.read().split("\n\n")[0].splitlines():
      if ":" in line:
        k, v = line.split(":", 1)
        out.setdefault(k.strip(), v.strip())
  return out


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="needs /proc/cpuinfo (Linux)")
def test_cpu_fingerprint_reads_the_first_processor():
  cpu = _first_processor()
  fp = provenance.cpu_fingerprint()
  assert fp["machine"] == platform.machine()
  assert fp["vendor"] == cpu.get("vendor_id", platform.processor() or "unknown")
  assert fp["model_name"] == cpu.get("model name", "unknown")
  assert fp["family_model_stepping"] == "/".join(cpu.get(k, "?") for k in ("cpu family", "model", "stepping"))
  flags = set(cpu.get("flags", "").split())
  isa = fp["isa"]
  assert isa == sorted(isa) and set(isa) <= flags
  known = {"sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "amx_tile"}
  assert set(isa) == flags & known  # every SIMD flag that matters, and only those
  assert provenance.cpu_fingerprint() == fp


@pytest.mark.oracle
def test_torch_backend_records_the_dispatch_overrides(monkeypatch):
  torch = pytest.importorskip("torch")
  for k in provenance.DISPATCH_ENV:
    monkeypatch.delenv(k, raising=False)
  monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_thunk_runtime=false")
  b = provenance.torch_backend()
  assert b["framework"] == "torch" and b["version"] == torch.__version__ and b["device"] == "cpu"
  assert b["num_threads"] == torch.get_num_threads()
  assert b["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
  assert b["blas"] == ("mkl" if torch.backends.mkl.is_available() else "other")
  assert b["cpu"] == provenance.cpu_fingerprint()
  assert b["dispatch_env"] == {"MKL_CBWR": "COMPATIBLE", "XLA_FLAGS": "--xla_cpu_use_thunk_runtime=false"}
