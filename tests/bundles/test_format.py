"""Stage bundles: ordered safetensors with provenance, lazy reads, streamed writes."""

import json

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from parity_jax.provenance import default_provenance
from parity_jax import bundles as stages, arraydiff
from parity_jax.errors import UsageError


def _example():
  rng = np.random.default_rng(0)
  return {
      "embedding": rng.standard_normal((1, 3, 8)).astype(np.float32),
      "layers.0.attn_norm": rng.standard_normal((1, 3, 8)).astype(ml_dtypes.bfloat16),
      "layers.0.q_proj": rng.standard_normal((1, 3, 4)).astype(np.float32),
      "final_norm": np.asarray(1.5, np.float32),
      "logits": rng.integers(0, 9, (1, 3)).astype(np.int32),
  }


def test_roundtrip_keeps_order_dtypes_bytes_and_provenance(tmp_path):
  data = _example()
  prov = default_provenance("test", seed=7, note={"free": ["form"]})
  path = tmp_path / "b.safetensors"
  stages.save_bundle(path, data, prov)
  back = stages.load_bundle(path)
  assert back.names == list(data)  # execution order, not alphabetical
  assert back.ordered
  for k in data:
    assert arraydiff.bit_equal(back[k], data[k]), k
  assert back.provenance["seed"] == 7 and back.provenance["note"] == {"free": ["form"]}
  assert back.provenance["versions"]["numpy"] == np.__version__
  via_class = stages.StageBundle.load(path)  # the classmethod reads the same file the same way
  assert via_class.names == back.names and all(arraydiff.bit_equal(via_class[k], data[k]) for k in data)
  # and it is plain safetensors for everyone else
  plain = safetensors.numpy.load_file(str(path))
  assert sorted(plain) == sorted(data)


def test_plain_safetensors_and_npz_are_accepted(tmp_path):
  data = _example()
  safetensors.numpy.save_file(data, str(tmp_path / "plain.safetensors"))
  b = stages.load_bundle(tmp_path / "plain.safetensors")
  assert not b.ordered and sorted(b.names) == sorted(data)
  np.savez(tmp_path / "x.npz", **{k: v for k, v in data.items() if v.dtype != ml_dtypes.bfloat16})
  z = stages.load_bundle(tmp_path / "x.npz")
  assert "embedding" in z and not z.ordered


def test_unreadable_inputs_are_usage_errors(tmp_path):
  with pytest.raises(UsageError, match="no such file"):
    stages.load_bundle(tmp_path / "missing.safetensors")
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"this is not safetensors")
  with pytest.raises(UsageError, match="cannot read .* as safetensors"):
    stages.load_bundle(bad)
  with pytest.raises(UsageError, match="directory"):
    stages.load_bundle(tmp_path)


def test_lazy_reader_reads_row_ranges(tmp_path):
  big = np.arange(40 * 6, dtype=np.float32).reshape(40, 6)
  path = tmp_path / "b.safetensors"
  stages.save_bundle(path, {"w": big, "s": np.float32([1, 2])})
  with stages.BundleReader(path) as r:
    assert r.names == ["w", "s"] and r.shape("w") == (40, 6) and r.dtype("w") == np.float32
    assert arraydiff.bit_equal(r.get_rows("w", 10, 13), big[10:13])


def test_streaming_writer_produces_a_standard_file(tmp_path):
  data = _example()
  path = tmp_path / "stream.safetensors"
  specs = [(k, v.shape, v.dtype) for k, v in data.items()]
  with stages.BundleWriter(path, specs, {"producer": "stream"}) as w:
    for k, v in data.items():
      if v.ndim and v.shape[0] > 1:
        w.write_rows(k, v[:1])
        w.write_rows(k, v[1:])
      else:
        w.write(k, v)
  back = stages.load_bundle(path)
  assert back.names == list(data) and back.provenance == {"producer": "stream"}
  for k in data:
    assert arraydiff.bit_equal(back[k], data[k]), k
  plain = safetensors.numpy.load_file(str(path))
  assert arraydiff.bit_equal(plain["layers.0.attn_norm"], data["layers.0.attn_norm"])


def test_streaming_writer_leaves_nothing_on_failure(tmp_path):
  path = tmp_path / "s.safetensors"
  with pytest.raises(UsageError, match="incomplete"):
    with stages.BundleWriter(path, [("a", (4,), np.float32)]) as w:
      w.write_rows("a", np.zeros(2, np.float32))
  assert list(tmp_path.iterdir()) == []
  with pytest.raises(UsageError, match="declared order"):
    with stages.BundleWriter(path, [("a", (1,), np.float32), ("b", (1,), np.float32)]) as w:
      w.write("b", np.zeros(1, np.float32))
  assert list(tmp_path.iterdir()) == []


def test_bad_stage_order_metadata_is_refused(tmp_path):
  path = tmp_path / "b.safetensors"
  safetensors.numpy.save_file(
      {"a": np.zeros(1, np.float32)}, str(path), metadata={"stage_order": json.dumps(["a", "zzz"])}
  )
  with pytest.raises(UsageError, match="stage_order"):
    stages.load_bundle(path)


def test_corrupt_npz_is_a_usage_error(tmp_path):
  bad = tmp_path / "bad.npz"
  bad.write_bytes(b"PK\x03\x04 not really a zip")
  with pytest.raises(UsageError, match="cannot read .* as .npz"):
    stages.load_bundle(bad)


def test_save_bundle_is_byte_deterministic(tmp_path):
  data = _example()
  prov = {"producer": "x", "seed": 1, "inputs": {"tokens": [[1, 2]]}, "z": 0, "a": 1}
  stages.save_bundle(tmp_path / "1.safetensors", data, prov)
  stages.save_bundle(tmp_path / "2.safetensors", dict(data), dict(reversed(list(prov.items()))))
  assert (tmp_path / "1.safetensors").read_bytes() == (tmp_path / "2.safetensors").read_bytes()


def test_the_lazy_reader_names_a_missing_stage_and_the_writer_refuses_extra_rows(tmp_path):
  path = tmp_path / "b.safetensors"
  stages.save_bundle(path, {"w": np.zeros((4, 2), np.float32)})
  with stages.BundleReader(path) as r:
    with pytest.raises(UsageError, match="no stage named 'v'"):
      r.get_rows("v", 0, 1)
  with pytest.raises(UsageError, match=r"w: more rows written than its declared shape \(3, 2\)"):
    with stages.BundleWriter(tmp_path / "s.safetensors", [("w", (3, 2), np.float32)]) as w:
      w.write_rows("w", np.zeros((2, 2), np.float32))
      w.write_rows("w", np.zeros((2, 2), np.float32))  # 4 rows into 3
  assert sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors"]  # nothing written


def test_big_endian_input_is_stored_as_its_values(tmp_path):
  values = np.array([1.5, -2.25, 3e38], np.float32)
  stages.save_bundle(tmp_path / "b.safetensors", {"be": values.astype(">f4"), "le": values})
  back = stages.load_bundle(tmp_path / "b.safetensors")
  for k in ("be", "le"):  # safetensors is little-endian: the same bytes for both
    assert back[k].dtype == np.float32 and back[k].tobytes() == values.astype("<f4").tobytes(), k


def test_membership_duplicate_names_and_unreadable_metadata(tmp_path):
  path = tmp_path / "b.safetensors"
  stages.save_bundle(path, {"w": np.zeros(2, np.float32)})
  with stages.BundleReader(path) as r:
    assert "w" in r and "v" not in r
  with pytest.raises(UsageError, match="duplicate stage name 'a'"):
    stages.BundleWriter(tmp_path / "d.safetensors", [("a", (1,), np.float32), ("a", (1,), np.float32)])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors"]  # nothing written
  for key in ("provenance", "stage_order"):
    bad = tmp_path / f"{key}.safetensors"
    safetensors.numpy.save_file({"w": np.zeros(1, np.float32)}, str(bad), metadata={key: "{not json"})
    with pytest.raises(UsageError, match=f"{key} metadata is not valid JSON"):
      stages.load_bundle(bad)


def test_stage_bundle_mapping_save_and_every_refusal(tmp_path):
  """The in-memory bundle as a mapping (order, length, repr, save/load), and each refusal of the bundle writers."""
  b = stages.StageBundle([("z", np.ones(2, np.float32)), ("a", np.zeros(1, np.int32))], {"producer": "t"})
  assert list(b) == ["z", "a"] and len(b) == 2 and repr(b) == "StageBundle(2 stages, producer='t')"
  b.save(tmp_path / "b.safetensors")
  back = stages.StageBundle.load(tmp_path / "b.safetensors")
  assert back.names == ["z", "a"] and back.provenance == {"producer": "t"} and arraydiff.bit_equal(back["z"], b["z"])
  for bad_name in ("", 3):
    with pytest.raises(UsageError, match="stage names must be non-empty strings"):
      stages.StageBundle({bad_name: np.ones(1)})
  with pytest.raises(UsageError, match="stage bundles cannot store dtype complex64"):
    stages.StageBundle({"c": np.ones(1, np.complex64)})
  with pytest.raises(UsageError, match="stage bundles cannot store dtype complex64"):
    stages.BundleWriter(tmp_path / "c.safetensors", [("c", (1,), np.complex64)])
  with stages.BundleReader(tmp_path / "b.safetensors") as r:
    with pytest.raises(UsageError, match="no stage named 'q'"):
      r.get("q")
  with pytest.raises(UsageError, match="no such file"):
    stages.load_bundle(tmp_path / "nope.npz")
  for rows, words in [
      (np.zeros((1, 2), np.float64), "w: dtype float64 does not match declared float32"),
      (np.zeros((1, 3), np.float32), r"w: row block \(1, 3\) does not fit declared shape \(3, 2\)"),
  ]:
    with pytest.raises(UsageError, match=words):
      with stages.BundleWriter(tmp_path / "w.safetensors", [("w", (3, 2), np.float32)]) as w:
        w.write_rows("w", rows)
  with pytest.raises(UsageError, match="'v' is not a declared tensor"):
    with stages.BundleWriter(tmp_path / "w.safetensors", [("w", (1, 2), np.float32)]) as w:
      w.write("v", np.zeros((1, 2), np.float32))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors"]  # no writer left a file behind
