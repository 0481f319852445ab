"""Checkpoint formats: the one seam where a format plugs in.

:func:`open_checkpoint` opens one side of a migration (metadata only) in
whichever registered format recognises it. A format is a module here that
provides a :class:`~.base.Checkpoint` subclass with its
:class:`~.base.LeafReader`, and a ``detect(path) -> bool`` / ``open(path,
role) -> Checkpoint`` pair registered in :data:`FORMATS` below; the stream,
the verifier and the migrator see only the base classes. The formats:

* ``safetensors`` (:mod:`.safetensors`) -- a Hugging Face directory with
  ``model.safetensors`` or shards listed in ``model.safetensors.index.json``;
  leaves read by byte range from the header offsets.
* ``orbax`` (:mod:`.orbax`, :mod:`.orbax_layout`, :mod:`.tstore`) -- every
  PyTree layout orbax has written since 0.5.

Where the bytes live (a local directory, a bucket) is the other seam:
:mod:`parity_jax.stores`.
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple

from parity_jax.checkpoint.formats.base import Checkpoint, LeafMeta, LeafReadError, LeafReader
from parity_jax.stores import listing_snapshot

__all__ = ["FORMATS", "Checkpoint", "LeafMeta", "LeafReadError", "LeafReader", "open_checkpoint"]


class Format(NamedTuple):
  name: str
  detect: Callable[[str], bool]  # does ``path`` hold a checkpoint of this format? (cheap: looks at names only)
  open: Callable[[str, str], Checkpoint]  # (path, role) -> the opened checkpoint; one-line UsageError otherwise


def _safetensors() -> Format:
  from parity_jax.checkpoint.formats import safetensors

  return Format("safetensors", safetensors.detect, safetensors.open_safetensors)


def _orbax() -> Format:
  from parity_jax.checkpoint.formats import orbax

  return Format("orbax", lambda path: True, orbax.open_orbax)


# In detection order; the last one (orbax) also explains, in one line, what a path that no format
# recognises is instead.
FORMATS: tuple[Callable[[], Format], ...] = (_safetensors, _orbax)


def open_checkpoint(path: str | os.PathLike, role: str = "checkpoint") -> Checkpoint:
  """Opens ``path`` (metadata only) in the first format that recognises it; a one-line UsageError otherwise."""
  path = os.fspath(path)
  with listing_snapshot():  # which format, which layout, the commit marker: one listing of a bucket prefix
    for make in FORMATS:
      fmt = make()
      if fmt.detect(path):
        return fmt.open(path, role)
  raise AssertionError("unreachable: the last format explains every path")  # pragma: no cover
