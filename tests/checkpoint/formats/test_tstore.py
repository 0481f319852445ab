"""How a stored array's chunk encoding is named and whether its chunks are plain bytes (a sub-box is a byte range).

Arrays are created by tensorstore in memory with the codecs named in each case; the expected answers follow from
those codecs by hand. Codec descriptions tensorstore cannot create (zarr v2 filters, odd JSON) are given as JSON.
"""

from __future__ import annotations

import logging
import types

import pytest
import tensorstore as ts

from parity_jax.checkpoint.formats.tstore import codec_info, codec_name, quiet_orbax, raw_chunks, read_context

_GRID = {"name": "regular", "configuration": {"chunk_shape": [2, 4]}}
_SHARD = {"name": "regular", "configuration": {"chunk_shape": [4, 4]}}


def _zarr3(codecs, grid=_GRID):
  return {"driver": "zarr3", "metadata": {"shape": [4, 4], "chunk_grid": grid, "codecs": codecs}}


def _sharded(inner):
  return _zarr3([{"name": "sharding_indexed", "configuration": {"chunk_shape": [2, 4], "codecs": inner}}], _SHARD)


CASES = [
    ({"driver": "zarr", "metadata": {"shape": [4, 4], "chunks": [2, 4], "compressor": None}}, (True, "none")),
    (
        {"driver": "zarr", "metadata": {"shape": [4, 4], "chunks": [2, 4], "compressor": {"id": "zstd", "level": 1}}},
        (False, "zstd"),
    ),
    (_zarr3([{"name": "bytes"}]), (True, "none")),
    (_zarr3([{"name": "bytes"}, {"name": "zstd"}]), (False, "zstd")),
    (_zarr3([{"name": "transpose", "configuration": {"order": [1, 0]}}, {"name": "bytes"}]), (False, "none")),
    (_sharded([{"name": "bytes"}]), (True, "none")),  # orbax's uncompressed arrays: bytes inside the shard
    (_sharded([{"name": "bytes"}, {"name": "zstd"}]), (False, "zstd")),  # orbax's default
    (_sharded([{"name": "bytes"}, {"name": "crc32c"}]), (False, "crc32c")),  # a checksum inside: not plain bytes
    (
        {"driver": "n5", "metadata": {"dimensions": [4, 4], "blockSize": [2, 4], "compression": {"type": "raw"}}},
        (False, "?"),
    ),
]


@pytest.mark.parametrize("spec, want", CASES, ids=[str(i) for i in range(len(CASES))])
def test_codecs_of_arrays_tensorstore_made(spec, want):
  t = ts.open({"kvstore": {"driver": "memory"}, "create": True, "dtype": "float32", **spec}).result()
  assert codec_info(t) == want
  assert (raw_chunks(t), codec_name(t)) == want


def _fake(codec):
  def to_json():
    if isinstance(codec, Exception):
      raise codec
    return codec

  return types.SimpleNamespace(codec=types.SimpleNamespace(to_json=to_json))


@pytest.mark.parametrize(
    "codec, want",
    [
        ({"driver": "zarr", "compressor": None, "filters": [{"id": "delta"}]}, (False, "delta")),
        ({"driver": "zarr", "compressor": {"id": "blosc"}, "filters": [{"id": "delta"}, {}]}, (False, "delta+?+blosc")),
        ({"driver": "zarr", "filters": None}, (False, "none")),  # no compressor member: unknown, so not raw
        ({"driver": "zarr", "compressor": {"level": 1}}, (False, "?")),  # a compressor without an id
        ({"driver": "zarr3", "codecs": "bytes"}, (False, "?")),
        ({"driver": "zarr3", "codecs": [{"name": "bytes"}, "odd"]}, (False, "?")),
        ({"driver": "zarr3", "codecs": [{"name": "bytes"}, {}]}, (False, "?")),
        (
            {  # shards inside shards: the innermost codecs count
                "driver": "zarr3",
                "codecs": [
                    {
                        "name": "sharding_indexed",
                        "configuration": {
                            "codecs": [{"name": "sharding_indexed", "configuration": {"codecs": [{"name": "bytes"}]}}]
                        },
                    }
                ],
            },
            (True, "none"),
        ),
        ({"driver": "zarr3", "codecs": [{"name": "sharding_indexed"}]}, (False, "?")),  # no configuration
        ({"driver": "zarr3", "codecs": [{"name": "sharding_indexed"}, {"name": "bytes"}]}, (False, "sharding_indexed")),
        ("zarr", (False, "?")),
        (ValueError("no codec"), (False, "?")),
    ],
)
def test_codec_descriptions_tensorstore_cannot_make(codec, want):
  assert codec_info(_fake(codec)) == want


def test_read_context_has_the_chunk_cache_asked_for_and_the_stores_resources():
  ctx = read_context(12345, {"s3_request_concurrency": {"limit": 3}})
  assert ctx["cache_pool"].to_json()["total_bytes_limit"] == 12345
  assert ctx["cache_pool#ocdbt"].to_json()["total_bytes_limit"] == 8 << 20
  assert ctx["s3_request_concurrency"].to_json()["limit"] == 3
  assert read_context()["cache_pool"].to_json() == {}  # a limit of 0 (no cache), tensorstore's default
  assert ctx["file_io_mode"].to_json() == {"mode": "memmap"}  # this tensorstore has memory-mapped reads


def test_quiet_orbax_raises_the_absl_level_only_while_active_and_never_lowers_it():
  logger = logging.getLogger("absl")
  old = logger.level
  try:
    logger.setLevel(logging.INFO)
    with quiet_orbax():
      assert logger.level == logging.ERROR
    assert logger.level == logging.INFO
    logger.setLevel(logging.CRITICAL)
    with quiet_orbax():
      assert logger.level == logging.CRITICAL  # already quieter: left alone
    assert logger.level == logging.CRITICAL
    logger.setLevel(logging.INFO)
    with pytest.raises(RuntimeError), quiet_orbax(logging.WARNING):
      assert logger.level == logging.WARNING
      raise RuntimeError("orbax failed")
    assert logger.level == logging.INFO  # put back on the way out of an error too
  finally:
    logger.setLevel(old)
