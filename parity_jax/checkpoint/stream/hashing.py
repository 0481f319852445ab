"""sha256 beside the comparison: of compared pieces in a pipeline thread, of one side read by a thread of its own,
and with an exportable intermediate state (a leaf's hash relayed between the processes of a job)."""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import threading
from typing import Any, Callable, Sequence

import numpy as np

from parity_jax.checkpoint import geometry
from parity_jax.checkpoint.formats.base import Checkpoint, LeafMeta
from parity_jax.checkpoint.stream.buffers import Buffers, as_bytes, view
from parity_jax.checkpoint.stream.plan import PIPELINE_DEPTH
from parity_jax.errors import UsageError

__all__ = ["BackgroundHash", "HashPipeline", "Sha256State"]


class HashPipeline:
  """sha256 of source pieces in order, in a thread of its own, overlapped with the next reads and comparisons.

  The comparison takes a free pool buffer (:meth:`acquire`), reads a source
  piece into it, and :meth:`submit`s it once compared; the thread hashes it
  and frees the buffer. hashlib releases the GIL on large buffers, as do
  tensorstore's reads and numpy's comparison, so the two run on two cores.
  """

  def __init__(self, buffers: Buffers, name: str, new_hash: Callable[[], Any] = hashlib.sha256):
    import queue

    self.buffers = buffers
    self.h = new_hash()
    self._free: "queue.Queue[int]" = queue.Queue()
    self._todo: "queue.Queue[tuple[int, int] | None]" = queue.Queue()
    for i in range(PIPELINE_DEPTH):
      self._free.put(i)
    self._thread = threading.Thread(target=self._run, name=f"parity_jax-sha256:{name}", daemon=True)
    self._thread.start()

  def _run(self) -> None:
    while True:
      item = self._todo.get()
      if item is None:
        return
      i, n = item
      self.h.update(memoryview(self.buffers.pool(i)[:n]))
      self._free.put(i)

  def acquire(self) -> int:
    return self._free.get()

  def release(self, i: int) -> None:
    """Returns a buffer that was not submitted (its piece differed or failed to read)."""
    self._free.put(i)

  def submit(self, i: int, nbytes: int) -> None:
    self._todo.put((i, nbytes))

  def finish(self) -> str:
    self.stop()
    return self.h.hexdigest()

  def stop(self) -> None:
    if self._thread.is_alive():
      self._todo.put(None)
      self._thread.join()


class BackgroundHash:
  """sha256 of one ``raw`` side's C-order bytes, read piece by piece by a thread of its own.

  Used when the other side must decode (nearly) its whole leaf before the
  first piece can be compared: the hash is done by the time the comparison
  starts. With ``keep`` (one buffer per piece), the pieces stay in those
  buffers and the comparison takes them from there (:meth:`piece`) instead of
  reading this side a second time; otherwise they pass through ``buf``.
  """

  def __init__(
      self,
      ckpt: Checkpoint,
      meta: LeafMeta,
      boxes: list[tuple],
      buf: np.ndarray,
      new_hash: Callable[[], Any] = hashlib.sha256,
      keep: Sequence[np.ndarray] | None = None,
  ):
    self.ckpt, self.meta, self.boxes, self.buf = ckpt, meta, boxes, buf
    self.keep = list(keep) if keep is not None and len(keep) >= len(boxes) else None
    self.h = new_hash()
    self.error: BaseException | None = None
    self._stop = threading.Event()
    self._ready = [threading.Event() for _ in boxes]
    self._thread = threading.Thread(target=self._run, name=f"parity_jax-sha256:{meta.path}", daemon=True)
    self._thread.start()

  def _run(self) -> None:
    try:
      with self.ckpt.reader(self.meta, 0) as reader:
        for k, box in enumerate(self.boxes):
          if self._stop.is_set():
            return
          buf = self.keep[k] if self.keep is not None else self.buf
          v = view(buf, geometry.box_shape(box) if box else (), self.meta.dtype)
          reader.wait(reader.read_into_async(box, v))
          self.h.update(as_bytes(v))
          self._ready[k].set()
    except BaseException as e:  # noqa: BLE001 -- re-raised in the caller's thread by finish() / piece()
      self.error = e
    finally:
      for r in self._ready:  # wake a waiting piece(): it finds the error (or the stop)
        r.set()

  def piece(self, k: int) -> np.ndarray:
    """Piece ``k`` as read into its kept buffer (waits for it); re-raises the thread's read error."""
    self._ready[k].wait()
    if self.error is not None:
      raise self.error
    box = self.boxes[k]
    return view(self.keep[k], geometry.box_shape(box) if box else (), self.meta.dtype)

  def finish(self) -> str:
    self._thread.join()
    if self.error is not None:
      raise self.error
    return self.h.hexdigest()

  def stop(self) -> None:
    self._stop.set()
    self._thread.join()


# ---------------------------------------------------------------------------------------------
# sha256 with an exportable intermediate state


class _Ctx(ctypes.Structure):
  # OpenSSL's SHA256_CTX (sha.h), unchanged since 0.9.8.
  _fields_ = [
      ("h", ctypes.c_uint32 * 8),
      ("Nl", ctypes.c_uint32),
      ("Nh", ctypes.c_uint32),
      ("data", ctypes.c_uint32 * 16),
      ("num", ctypes.c_uint),
      ("md_len", ctypes.c_uint),
  ]


_LIB: Any = None


def _libcrypto():
  global _LIB
  if _LIB is None:
    name = ctypes.util.find_library("crypto")
    lib = None
    for candidate in ([name] if name else []) + ["libcrypto.so.3", "libcrypto.so.1.1", "libcrypto.so"]:
      try:
        lib = ctypes.CDLL(candidate)
        lib.SHA256_Init, lib.SHA256_Update, lib.SHA256_Final  # noqa: B018 -- all three must exist
        break
      except (OSError, AttributeError):
        lib = None
    if lib is None:
      raise UsageError("splitting a leaf's sha256 across processes needs OpenSSL's libcrypto (not found)")
    # argument checking only: every call below passes ctypes objects of exactly these types (byref, c_void_p,
    # c_size_t, a string buffer), so a missing declaration changes no result (no mutate on these three lines)
    lib.SHA256_Init.argtypes = [ctypes.POINTER(_Ctx)]  # no mutate
    lib.SHA256_Update.argtypes = [ctypes.POINTER(_Ctx), ctypes.c_void_p, ctypes.c_size_t]  # no mutate
    lib.SHA256_Final.argtypes = [ctypes.c_char_p, ctypes.POINTER(_Ctx)]  # no mutate
    _LIB = lib
  return _LIB


class Sha256State:
  """sha256 whose intermediate state can be exported and resumed in another process (OpenSSL; GIL released).

  ``hashlib``-like: :meth:`update`, :meth:`hexdigest` (of a copy: the state
  stays usable); :meth:`export` / :meth:`resume` carry the state (112 bytes).
  """

  def __init__(self, state: bytes | None = None):
    self._lib = _libcrypto()
    if state is None:
      self._ctx = _Ctx()
      self._lib.SHA256_Init(ctypes.byref(self._ctx))
    else:
      if len(state) != ctypes.sizeof(_Ctx):
        raise ValueError(f"a sha256 state is {ctypes.sizeof(_Ctx)} bytes, got {len(state)}")
      self._ctx = _Ctx.from_buffer_copy(state)

  @classmethod
  def resume(cls, state: bytes) -> "Sha256State":
    return cls(state)

  def export(self) -> bytes:
    return bytes(self._ctx)

  def update(self, data) -> None:
    a = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
    if a.size:
      self._lib.SHA256_Update(ctypes.byref(self._ctx), ctypes.c_void_p(a.ctypes.data), ctypes.c_size_t(a.size))

  def hexdigest(self) -> str:
    c = _Ctx.from_buffer_copy(bytes(self._ctx))
    out = ctypes.create_string_buffer(32)
    self._lib.SHA256_Final(out, ctypes.byref(c))
    return out.raw.hex()
