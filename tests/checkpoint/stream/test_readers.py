"""Reading source pieces back from the verifier's spill file: the bytes at each piece's offset, and a short file.

The spill file is written here with plain file writes; the expected pieces are slices of the array written.
"""

from __future__ import annotations

import threading

import numpy as np

from parity_jax.checkpoint.stream.plan import Piece
from parity_jax.checkpoint.stream.readers import SpillReader
from parity_jax.errors import UsageError

A = np.arange(40, dtype=np.float64) * -0.5


def test_pieces_read_back_from_their_offsets_and_a_short_file_is_one_line(tmp_path):
  path = tmp_path / "spill"
  path.write_bytes(A.tobytes())
  with open(path, "rb") as f:
    r = SpillReader(f, A.itemsize)
    for lo, hi in [(0, 7), (7, 40), (13, 14)]:
      out = np.empty(hi - lo, np.float64)
      assert r.start(0, out, Piece(lo, hi, (), ())) is None  # read at once: nothing to wait for
      assert out.tobytes() == A[lo:hi].tobytes()
    out = np.empty(10, np.float64)
    errors = []

    def short():  # 5 of its 10 elements lie past the end (byte 320): an error, never a wait for more bytes
      try:
        r.start(0, out, Piece(35, 45, (), ()))
      except UsageError as e:
        errors.append(str(e))

    t = threading.Thread(target=short, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "reading past the end of the spill file never returned"
    assert errors == ["cannot read back the verifier's spill file: it ended early at byte 320"]
