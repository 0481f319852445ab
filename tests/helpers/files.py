"""Snapshots of a directory tree, to prove a tool never wrote into its inputs."""

from __future__ import annotations

import os

from parity_jax.files import file_sha256


def hash_file_tree(root: str | os.PathLike) -> dict[str, tuple[int, int, str]]:
  """{relative path: (size, mtime_ns, sha256)} of every file under ``root`` (directories as ``(0, 0, "dir")``)."""
  out = {}
  root = os.fspath(root)
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    out[os.path.relpath(dirpath, root) + "/"] = (0, 0, "dir")
    for name in sorted(filenames):
      p = os.path.join(dirpath, name)
      st = os.stat(p)
      out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns, file_sha256(p))
  return out
