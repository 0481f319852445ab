"""The one protocol of parity_jax's result objects.

Every result a job returns (:class:`~parity_jax.checkpoint.VerifyReport`,
:class:`~parity_jax.checkpoint.MigrateResult`,
:class:`~parity_jax.bundles.BundleReport`, :class:`~parity_jax.svf.ReplayResult`)
is a :class:`Report`:

* ``passed`` and ``exit_code`` (0 passed, 1 not: the tools exit with it);
* ``to_dict()`` (JSON-ready; non-finite floats as in :mod:`parity_jax.jsonio`),
  ``to_json()`` and ``write_json(path)`` (atomic, returns the absolute path);
* ``text()`` for terminals and logs, and ``_repr_html_()`` for notebooks.
"""

from __future__ import annotations

import abc
import html
import os
from typing import Any

from parity_jax import jsonio

__all__ = ["Report"]


class Report(abc.ABC):
  """Base of every result object: subclasses define ``passed``, ``to_dict`` and ``text``."""

  @property
  @abc.abstractmethod
  def passed(self) -> bool:
    """True when the job found nothing wrong."""

  @property
  def exit_code(self) -> int:
    """The tools' exit code for this result: 0 passed, 1 not (2 is for bad input, raised before a result)."""
    return 0 if self.passed else 1

  @abc.abstractmethod
  def to_dict(self) -> dict[str, Any]:
    """The whole result as JSON-ready data."""

  def to_json(self, indent: int | None = 1) -> str:
    """Strict JSON text of :meth:`to_dict`."""
    return jsonio.dumps(self.to_dict(), indent=indent)

  def write_json(self, path: str | os.PathLike) -> str:
    """Writes :meth:`to_json` atomically; returns the absolute path."""
    return jsonio.write_json(path, self.to_dict())

  @abc.abstractmethod
  def text(self) -> str:
    """The result for people: tables and a verdict line."""

  def _repr_html_(self) -> str:
    return f"<pre>{html.escape(self.text())}</pre>"

  def __str__(self) -> str:
    return self.text()
