"""The one protocol of parity_jax's result objects.

Every result a job returns (:class:`~parity_jax.checkpoint.VerifyReport`,
:class:`~parity_jax.checkpoint.MigrateResult`,
:class:`~parity_jax.bundles.BundleReport`, :class:`~parity_jax.svf.ReplayResult`)
is a :class:`Report`:

* ``passed`` and ``exit_code`` (0 passed, 1 not: the tools exit with it);
* ``to_dict()`` (JSON-ready; non-finite floats as in :mod:`parity_jax.jsonio`),
  ``to_json()`` and ``write_json(path)`` (atomic, returns the absolute path);
* ``text()`` for terminals and logs, ``_repr_html_()`` for notebooks, and
  ``write_html(path)``: that HTML as a standalone page (atomic, returns the
  absolute path), which the tools' ``--html=FILE`` writes.
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

  def html_page(self, title: str | None = None) -> str:
    """:meth:`_repr_html_` as a standalone HTML document (UTF-8, a title, readable table borders)."""
    title = title or type(self).__name__
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:1.5em} table{border-collapse:collapse}"
        " td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}"
        " code{font-size:90%}</style>"
        f"</head><body>\n{self._repr_html_()}\n</body></html>\n"
    )

  def write_html(self, path: str | os.PathLike, title: str | None = None) -> str:
    """Writes :meth:`html_page` atomically; returns the absolute path."""
    from parity_jax.files import write_text_atomic

    return write_text_atomic(path, self.html_page(title))

  def __str__(self) -> str:
    return self.text()
