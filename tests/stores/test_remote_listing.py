"""stores.listing_snapshot: a bucket prefix listed once answers the later questions of the same or a deeper prefix.

Against the GCS emulator on 127.0.0.1; the requests are tensorstore's own counts (stores.io_stats), the bucket's
contents put there with the emulator's plain HTTP helper, never through the code under test.
"""

from __future__ import annotations

import numpy as np

from parity_jax import stores
from parity_jax.checkpoint import open_checkpoint
from tests.helpers import ckpt as H


def _lists_and_reads(since: dict) -> tuple[int, int]:
  io = stores.io_stats(since=since)["gs"]
  return io["lists"], io["reads"]


def test_a_snapshot_lists_a_prefix_once_and_answers_deeper_questions_from_it(gcs_bucket):
  for key in ("ck/a/x", "ck/a/y", "ck/b", "other/z"):
    gcs_bucket.put(key, b"1")
  ck = stores.open_store(f"{gcs_bucket.url}/ck")
  assert ck.child("b").read_bytes() == b"1"  # the bucket's first use (its check) out of the counts
  io0 = stores.io_stats()
  with stores.listing_snapshot():
    assert ck.walk() == ["a/x", "a/y", "b"]
    assert ck.child("a").listdir() == (["x", "y"], [])
    assert ck.child("a").is_dir() and not ck.child("c").is_dir()
    assert ck.child("a/x").is_file() and not ck.child("a/q").is_file() and ck.child("b").is_file()
    with stores.listing_snapshot():  # nested: the same snapshot
      assert ck.child("a").walk() == ["x", "y"]
    assert ck.walk() == ["a/x", "a/y", "b"]  # and it outlives the nested block: still no request
    assert _lists_and_reads(io0) == (1, 0)
    other = gcs_bucket.emulator.create_bucket()  # the same prefix in another bucket is its own listing
    gcs_bucket.emulator.put(other, "ck/a/w", b"3")
    assert stores.open_store(f"gs://{other}/ck/a").walk() == ["w"]
  gcs_bucket.put("ck/a/new", b"2")  # after the block, listings are live again
  io1 = stores.io_stats()
  assert ck.child("a").walk() == ["new", "x", "y"] and ck.child("a/new").is_file()
  assert _lists_and_reads(io1) == (1, 1)
  with stores.listing_snapshot():  # a shorter prefix than any listed before is listed itself
    assert stores.open_store(gcs_bucket.url).walk() == ["ck/a/new", "ck/a/x", "ck/a/y", "ck/b", "other/z"]


def test_opening_a_bucket_checkpoint_lists_its_prefix_once(gcs_bucket, tmp_path):
  url = gcs_bucket.upload_tree(H.save_v1(tmp_path / "ck", {"a": np.arange(6, dtype=np.float32)}), "ck")
  io0 = stores.io_stats()
  ckpt = open_checkpoint(url)
  assert list(ckpt.leaves) == ["a"]
  lists, _ = _lists_and_reads(io0)
  assert lists == 1  # safetensors detection (is_dir, listdir) and the orbax layout (walk) share it
