"""Where a model comes from: a directory -> a :class:`~parity_jax.qwen2.model.Model`.

Every workflow (stage capture, forward parity, decode parity) turns its
``model_dir`` into a model through :func:`model_source`, so a checkpoint
format plugs in by registering a :class:`ModelSource`: a ``detect`` test on a
directory, its ``config`` (read first, so inputs are checked before any
weight is read) and ``load`` (the weights, optionally straight onto a mesh).

Today there is one source, the Hugging Face layout (``config.json`` plus
``*.safetensors``, :func:`parity_jax.qwen2.load_params`). A converted
checkpoint (e.g. an Orbax checkpoint written by a conversion preset) becomes
a second source registered ahead of it; then
``parity-forward-parity --reference_dir=ORIGINAL --model_dir=CONVERTED``
runs HF on the original and this model on the converted directory unchanged.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from parity_jax.errors import UsageError
from parity_jax.qwen2.config import QwenConfig, load_config
from parity_jax.qwen2.model import Model
from parity_jax.qwen2.params import LoadReport, load_params

__all__ = ["HF_SOURCE", "ModelSource", "load_model", "model_source", "register_source", "sources", "unregister_source"]


@dataclasses.dataclass(frozen=True)
class ModelSource:
  """A checkpoint format: ``detect(dir) -> bool``, ``config(dir) -> QwenConfig``, ``load(dir, cfg, ...) -> (Params, LoadReport)``.

  ``load`` takes keyword arguments ``dtype``, ``strict``, ``mesh``, ``rules``
  and ``axis_rules`` as :func:`parity_jax.qwen2.load_params` does.
  """

  name: str
  detect: Callable[[str], bool]
  config: Callable[[str], QwenConfig]
  load: Callable[..., tuple[Any, LoadReport]]


def _is_hf_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "config.json"))


def _load_hf(path: str, cfg: QwenConfig, **kw: Any) -> tuple[Any, LoadReport]:
  return load_params(path, cfg, **kw)


HF_SOURCE = ModelSource("huggingface", _is_hf_dir, load_config, _load_hf)
_SOURCES: list[ModelSource] = [HF_SOURCE]


def sources() -> tuple[ModelSource, ...]:
  """The registered sources, in the order they are tried."""
  return tuple(_SOURCES)


def register_source(source: ModelSource) -> None:
  """Tries ``source`` before the ones registered so far (a later, more specific format first)."""
  _SOURCES.insert(0, source)


def unregister_source(source: ModelSource) -> None:
  """Removes a source :func:`register_source` added (the HF source stays)."""
  if source is not HF_SOURCE and source in _SOURCES:
    _SOURCES.remove(source)


def model_source(model_dir: str | os.PathLike) -> ModelSource:
  """The first source that recognises ``model_dir``; the HF source (whose errors name what is missing) otherwise."""
  path = os.fspath(model_dir)
  if not os.path.exists(path):
    raise UsageError(f"no such checkpoint directory: {path}")
  for source in _SOURCES:
    if source.detect(path):
      return source
  return HF_SOURCE


def load_model(
    model_dir: str | os.PathLike,
    dtype: Any = "float32",
    *,
    strict: bool = True,
    mesh: Any = None,
    rules: Any = None,
    axis_rules: Any = None,
    config: QwenConfig | None = None,
) -> tuple[Model, LoadReport]:
  """``model_dir`` as a :class:`Model` through its source, and what the load found (files, dtypes, placement notes)."""
  from parity_jax.qwen2.sharding import normalize_axis_rules

  path = os.fspath(model_dir)
  source = model_source(path)
  cfg = config if config is not None else source.config(path)
  axis_rules = normalize_axis_rules(axis_rules)
  params, report = source.load(path, cfg, dtype=dtype, strict=strict, mesh=mesh, rules=rules, axis_rules=axis_rules)
  return Model(cfg, params, axis_rules), report
