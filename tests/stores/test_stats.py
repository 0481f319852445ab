"""I/O accounting: this package's own local counters and tensorstore's file driver, per scheme, and differences.

Expected counts are the operations each test performs itself (one write of 1000 bytes is one write and 1000
bytes written); bucket schemes are counted against a live emulator in tests/stores/test_remote.py.
"""

from __future__ import annotations

import tensorstore as ts

from parity_jax import stores
from parity_jax.stores.stats import count_local

_FIELDS = ("requests", "reads", "writes", "lists", "deletes", "retries", "bytes_read", "bytes_written")


def test_own_local_counts_add_to_file_and_to_the_totals_and_since_gives_the_difference():
  before = stores.io_stats()
  count_local(reads=2, bytes_read=100)
  count_local(writes=1, bytes_written=7, lists=3, deletes=1)
  d = stores.io_stats(since=before)
  assert d["file"] == dict(
      requests=7, reads=2, writes=1, lists=3, deletes=1, retries=0, bytes_read=100, bytes_written=7
  )
  for scheme in ("gs", "s3"):
    assert d[scheme] == dict.fromkeys(_FIELDS, 0)
  assert (d["requests"], d["bytes_read"], d["bytes_written"]) == (7, 100, 7)
  assert d["http"]["requests"] == 0
  after = stores.io_stats()  # without since: counts from the start of the process, the totals over the schemes
  for k in ("requests", "bytes_read", "bytes_written"):
    assert after[k] == sum(after[s][k] for s in ("file", "gs", "s3"))
    assert after[k] - before[k] == d[k]
  assert after["file"]["bytes_read"] >= 100 and after["file"]["reads"] >= 2


def test_tensorstore_file_driver_reads_writes_lists_and_deletes_are_counted(tmp_path):
  kv = ts.KvStore.open({"driver": "file", "path": str(tmp_path) + "/"}).result()
  before = stores.io_stats()
  kv.write("a", b"x" * 1000).result()
  kv.write("b", b"y" * 24).result()
  assert kv.read("a").result().value == b"x" * 1000
  assert sorted(kv.list().result()) == [b"a", b"b"]
  kv.delete_range(ts.KvStore.KeyRange()).result()
  d = stores.io_stats(since=before)
  assert d["file"] == dict(
      requests=5, reads=1, writes=2, lists=1, deletes=1, retries=0, bytes_read=1000, bytes_written=1024
  )
  assert (d["requests"], d["bytes_read"], d["bytes_written"]) == (5, 1000, 1024)
  assert d["gs"]["requests"] == d["s3"]["requests"] == 0
