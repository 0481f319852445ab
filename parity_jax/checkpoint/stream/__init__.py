"""Streaming one leaf pair in bounded memory: the plan (a memory model) and the read/hash pipeline.

Modules: :mod:`.plan` (pieces, read modes, the memory model), :mod:`.buffers`,
:mod:`.readers` (one side's reads; the spill file), :mod:`.hashing` (sha256
beside the comparison), :mod:`.small` (many small pairs in batches),
:mod:`.pair` (:class:`PairStreamer`: the passes over one pair).

The verifier compares a source leaf and its migrated counterpart in *pieces*:
C-order slabs of the common refinement of the two shapes (:mod:`.geometry`),
each a box in both leaves, so a squeeze or reshape costs nothing. How a side
is read depends on how it is stored:

* ``raw`` -- uncompressed chunks read memory-mapped (:func:`.tstore.memmap_reads`):
  any box costs just its own bytes, so pieces can be small and need no cache.
* ``direct`` -- compressed chunks whose rows (:func:`.geometry.chunk_row_elems`)
  line up with the piece boundaries: every piece is made of whole chunk rows,
  so each chunk is decoded exactly once, without a cache.
* ``rows`` -- compressed chunk rows bigger than a piece (a single-chunk leaf
  is one row): a private tensorstore cache holds the current row while pieces
  are cut from it. Before the next row is decoded the reader is reopened,
  which drops the old row, so at most one row plus the next row's decode
  transient (its compressed bytes and the decoded chunk) is alive. With
  ``readahead`` = N, readers of their own decode the next N rows while the
  current one is compared: faster with free cores, about N more rows and
  their transients in memory.
* ``spill`` (pair level) -- both sides are ``rows`` and holding a row of each
  costs more than streaming the source once into a temporary file (outside
  both checkpoints) and comparing the migrated leaf against it.

**Many small leaves** (:class:`SmallPairs`): a pair whose leaves fit in one
piece is read whole, in batches of pairs read concurrently through the
handles each checkpoint opened once in its shared tensorstore context, one
batch ahead of the comparison; thousands of them cost little more than their
bytes. A differing or unreadable small pair is streamed the ordinary way.

Pieces are read straight into buffers allocated once per verification
(:class:`Buffers`): tensorstore writes into them, no array is allocated per
read. On this 2-core VM the page faults of fresh per-read arrays cost about as
much as zstd decoding, so this matters as much as anything else here.

**sha256.** When a pair is bit-identical both leaves are the same byte string,
so one hash serves both. By default (``pipelined``) each source piece, once
compared, is handed to a hashing thread while the next pieces are read and
compared (tensorstore, hashlib and numpy's comparison release the GIL); a
small pool of piece buffers bounds how far the two may drift apart. When the
other side must decode (nearly) its whole leaf before the first piece can be
compared, a ``raw`` side is instead hashed by a thread that reads it on its
own, during that decode (a migrated leaf of at most :data:`KEPT_PIECES`
pieces stays in the buffers that thread filled, and is compared from there
instead of being read again). Single-piece leaves are hashed inline. The
comparison stops at the first differing piece; a second pass then computes
both hashes and the difference statistics. Either way the reported hashes
equal ``sha256(leaf.tobytes())`` of each side.
"""

from parity_jax.checkpoint.stream.buffers import Buffers, bytes_equal
from parity_jax.checkpoint.stream.hashing import HashPipeline, Sha256State
from parity_jax.checkpoint.stream.pair import PairOutcome, PairStreamer
from parity_jax.checkpoint.stream.plan import (
    KEPT_PIECES,
    PIPELINE_DEPTH,
    SPILL_ABOVE_BYTES,
    PairPlan,
    Piece,
    SidePlan,
    pieces_of,
    plan_pair,
)
from parity_jax.checkpoint.stream.readers import SPILL_PREFIX
from parity_jax.checkpoint.stream.small import SMALL_BATCH_BYTES, SMALL_LEAF_BYTES, SmallPairs

__all__ = [
    "Buffers",
    "HashPipeline",
    "KEPT_PIECES",
    "PIPELINE_DEPTH",
    "PairOutcome",
    "PairPlan",
    "PairStreamer",
    "Piece",
    "SMALL_BATCH_BYTES",
    "SMALL_LEAF_BYTES",
    "SPILL_ABOVE_BYTES",
    "SPILL_PREFIX",
    "Sha256State",
    "SidePlan",
    "SmallPairs",
    "bytes_equal",
    "pieces_of",
    "plan_pair",
]
