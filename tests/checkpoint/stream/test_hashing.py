"""sha256 beside the comparison: the pipeline thread, the background reader thread, the exportable state.

Every expected digest is ``hashlib.sha256`` of the same bytes, computed here.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from parity_jax.checkpoint import open_checkpoint
from parity_jax.checkpoint.stream import Sha256State
from parity_jax.checkpoint.stream.buffers import Buffers, as_bytes, bytes_equal, view
from parity_jax.checkpoint.stream.hashing import BackgroundHash, HashPipeline
from parity_jax.errors import UsageError
from tests.helpers import safetensors_files as W

DATA = np.random.default_rng(3).integers(0, 256, 1000, dtype=np.uint8).tobytes()


def test_sha256_state_is_hashlib_and_resumes_from_its_exported_state():
  a = Sha256State()
  a.update(DATA[:333])
  state = a.export()
  assert len(state) == 112 and a.hexdigest() == hashlib.sha256(DATA[:333]).hexdigest()
  a.update(b"")  # nothing: still the same
  assert a.hexdigest() == hashlib.sha256(DATA[:333]).hexdigest()  # a digest leaves the state usable
  b = Sha256State.resume(state)  # another process goes on from here
  b.update(np.frombuffer(DATA[333:], np.uint8).reshape(667, 1))  # any shape of array: its bytes in C order
  assert b.hexdigest() == hashlib.sha256(DATA).hexdigest()
  assert Sha256State().hexdigest() == hashlib.sha256(b"").hexdigest()
  with pytest.raises(ValueError, match="a sha256 state is 112 bytes, got 111"):
    Sha256State(state[:-1])


def test_the_hash_pipeline_hashes_submitted_pieces_in_order_and_frees_their_buffers(monkeypatch):
  import threading

  crashed = []  # its thread ends by returning, not by an exception
  monkeypatch.setattr(threading, "excepthook", crashed.append)
  bufs = Buffers(300)
  hp = HashPipeline(bufs, "w")
  expected = hashlib.sha256()
  for k in range(0, len(DATA), 250):  # pieces of up to 250 bytes through buffers of 300
    piece = DATA[k : k + 250]
    i = hp.acquire()
    bufs.pool(i)[: len(piece)] = np.frombuffer(piece, np.uint8)
    hp.submit(i, len(piece))
    expected.update(piece)
  skipped = hp.acquire()  # a piece that differed: its buffer comes back unhashed
  bufs.pool(skipped)[:5] = 1
  hp.release(skipped)
  held = [hp.acquire() for _ in range(3)]  # every buffer free again (the thread returned them), three in all
  assert sorted(held) == [0, 1, 2]
  for i in held:
    hp.release(i)
  assert hp.finish() == expected.hexdigest()
  hp.stop()  # stopping twice is harmless
  assert not crashed, crashed


@pytest.fixture(scope="module")
def leaf(tmp_path_factory):
  d = tmp_path_factory.mktemp("st")
  a = np.arange(60, dtype=np.float32).reshape(6, 10) * -1.5
  W.write_file(d / "model.safetensors", {"w": a})
  ck = open_checkpoint(d)
  return ck, ck.leaves["w"], a


def test_background_hash_reads_one_side_piece_by_piece_and_keeps_the_pieces(leaf):
  ck, meta, a = leaf
  boxes = [(slice(0, 2), slice(0, 10)), (slice(2, 5), slice(0, 10)), (slice(5, 6), slice(0, 10))]
  want = hashlib.sha256(a.tobytes()).hexdigest()
  bh = BackgroundHash(ck, meta, boxes, np.empty(120, np.uint8))
  assert bh.finish() == want
  keep = [np.empty(120, np.uint8) for _ in boxes]
  bh = BackgroundHash(ck, meta, boxes, np.empty(120, np.uint8), keep=keep)
  for k, box in enumerate(boxes):
    assert bytes_equal(bh.piece(k), a[box]) and bh.piece(k).shape == a[box].shape
  assert bh.finish() == want
  bad = BackgroundHash(ck, meta, [(slice(0, 9), slice(0, 10))], np.empty(400, np.uint8), keep=[np.empty(400, np.uint8)])
  with pytest.raises(UsageError, match="leaf 'w'"):
    bad.piece(0)  # a box past the leaf's end: the thread's read error, raised here
  with pytest.raises(UsageError, match="leaf 'w'"):
    bad.finish()


def test_views_and_byte_equality():
  buf = np.arange(16, dtype=np.uint8)
  v = view(buf, (2, 2), np.dtype(np.uint16))
  assert v.shape == (2, 2) and v.tobytes() == bytes(range(8))
  assert view(buf, (), np.dtype(np.uint32)).tobytes() == bytes(range(4))  # a scalar: one element
  assert bytes(as_bytes(np.arange(3, dtype=np.int16))) == np.arange(3, dtype=np.int16).tobytes()
  x = np.array([0.0, np.nan, 1.0], np.float32)
  assert bytes_equal(x, x.copy()) and not bytes_equal(x, np.array([-0.0, np.nan, 1.0], np.float32))
  assert not bytes_equal(x, x.view(np.int32))  # another dtype
  assert not bytes_equal(np.zeros(3, np.uint8), np.zeros(4, np.uint8))
  odd = np.zeros(13, np.uint8)  # not a whole number of 8-byte words
  other = odd.copy()
  other[12] = 1
  assert bytes_equal(odd, odd.copy()) and not bytes_equal(odd, other)
  assert bytes_equal(np.zeros((2, 3), np.uint8).T, np.zeros(6, np.uint8))  # shapes may differ; a transposed view
