"""Checkpoint migration and value-exact verification.

* :class:`RemapSpec` -- declarative leaf remapping (regex rules, squeeze /
  reshape), validated against checkpoint metadata before any data is read.
* :func:`migrate` -- streaming, atomic migrator (a share of the leaves per
  process, one process included; tensorstore writes under orbax's own array
  specs).
* :func:`verify_migration` -- proves bit for bit that a migrated checkpoint is
  the source under the spec, in bounded memory; returns a
  :class:`VerifyReport`.
* :func:`open_checkpoint`, :class:`Checkpoint`, :class:`LeafReader`,
  :func:`restore_leaves` -- the read-only building blocks (metadata, box reads,
  orbax's own single-leaf restore).

Where things live: :mod:`.formats` (one module per checkpoint format, the seam
where a format plugs in; where the bytes live is :mod:`parity_jax.stores`),
:mod:`.spec` and :mod:`.keypath` (naming and remapping leaves), :mod:`.geometry`
(index geometry), :mod:`.stream` (streaming one leaf pair), :mod:`.shares`
(dividing a job's bytes among processes), :mod:`.verify` and :mod:`.migrate`
(the two jobs), :mod:`.example` (the shipped example).

Submodules import orbax/jax lazily, so importing this package is cheap.
"""

from parity_jax.checkpoint.formats import Checkpoint, LeafMeta, LeafReadError, LeafReader, open_checkpoint
from parity_jax.checkpoint.formats.orbax import restore_leaves
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
