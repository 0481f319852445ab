"""Orbax checkpoint migration and value-exact verification.

* :class:`RemapSpec` -- declarative leaf remapping (regex rules, squeeze /
  reshape), validated against checkpoint metadata before any data is read.
* :func:`migrate` -- streaming, atomic migrator (one leaf at a time,
  ``ocp.v1.partial.save`` + ``finalize``, chunked storage).
* :func:`verify_migration` -- proves bit for bit that a migrated checkpoint is
  the source under the spec, in bounded memory; returns a
  :class:`VerifyReport`.
* :func:`open_checkpoint`, :func:`restore_leaves`, :class:`LeafReader` --
  the read-only building blocks (metadata, single-leaf restore, chunked reads).

Submodules import orbax/jax lazily, so importing this package is cheap.
"""

from parity_jax.checkpoint.io import LeafReadError, LeafReader, restore_leaves
from parity_jax.checkpoint.layout import Checkpoint, LeafMeta, open_checkpoint
from parity_jax.checkpoint.migrate import MigrateResult, migrate
from parity_jax.checkpoint.spec import LeafPlan, MigrationPlan, RemapSpec, Rule, SpecError, Transform
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
    "RemapSpec",
    "Rule",
    "SpecError",
    "Transform",
    "VerifyReport",
    "migrate",
    "open_checkpoint",
    "restore_leaves",
    "verify_migration",
]
