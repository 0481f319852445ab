"""Orbax checkpoint migration and value-exact verification.

* :class:`RemapSpec` -- declarative leaf remapping (regex rules, squeeze /
  reshape), validated against checkpoint metadata before any data is read.
* :func:`migrate` -- streaming, atomic migrator (one leaf at a time,
  ``ocp.v1.partial.save`` + ``finalize``, chunked storage), or one job of
  many processes (``distributed=True``: :mod:`.migrate_distributed`).
* :func:`verify_migration` -- proves bit for bit that a migrated checkpoint is
  the source under the spec, in bounded memory; returns a
  :class:`VerifyReport`.
* :func:`open_checkpoint`, :func:`restore_leaves`, :class:`LeafReader` --
  the read-only building blocks (metadata, single-leaf restore, chunked reads);
  :mod:`.keypath` names leaves, :mod:`.geometry` and :mod:`.stream` plan and
  run the piecewise comparison, :mod:`.tstore` holds the tensorstore context.

Submodules import orbax/jax lazily, so importing this package is cheap.
"""

from parity_jax.checkpoint.reader import LeafReadError, LeafReader, restore_leaves
from parity_jax.checkpoint.layout import Checkpoint, LeafMeta, open_checkpoint
from parity_jax.checkpoint.migrate import MigrateResult, migrate
from parity_jax.checkpoint.spec import LeafPlan, MigrationPlan, RemapRule, RemapSpec, SpecError, Transform
from parity_jax.checkpoint.verify import GroupResult, LeafResult, VerifyReport, verify_migration

__all__ = [
    "Checkpoint",
    "GroupResult",
    "LeafMeta",
    "LeafPlan",
    "LeafReadError",
    "LeafReader",
    "LeafResult",
    "MigrateResult",
    "MigrationPlan",
    "RemapRule",
    "RemapSpec",
    "SpecError",
    "Transform",
    "VerifyReport",
    "migrate",
    "open_checkpoint",
    "restore_leaves",
    "verify_migration",
]
