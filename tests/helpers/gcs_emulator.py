"""gcp-storage-emulator with the few fixes tensorstore's ``gcs`` driver needs: ``python -m tests.helpers.gcs_emulator``.

The emulator (PyPI ``gcp-storage-emulator``, 2026.7.19) differs from real GCS
in five requests that tensorstore's JSON-API driver makes. This launcher
patches them in the *emulator process only* (never in parity_jax), then runs
the emulator's own ``start`` command in memory. Each patch names the request
and what real GCS does (docs/object_stores.md has the measured symptoms):

1. ``POST /upload/storage/v1/b/B/o?uploadType=media&name=K`` with an empty
   body (tensorstore's upload of an EMPTY object, e.g. orbax's
   ``orbax.checkpoint`` marker): the emulator reads the empty body as ``None``
   and fails with ``TypeError: object of type 'NoneType' has no len()``,
   closing the connection without a reply ("Empty reply from server"); real
   GCS stores an empty object. Patched: an empty body is ``b""``.
2. ``GET /storage/v1/b/B/o/K?alt=media``: the emulator sends no
   ``x-goog-generation`` header, so tensorstore records generation 0 and
   refuses its own next conditional read as "Malformed StorageGeneration"
   (OCDBT re-reads ``manifest.ocdbt`` that way). Patched: the header is sent
   (and ``x-goog-metageneration``).
3. The same GET with ``ifGenerationMatch`` / ``ifGenerationNotMatch``: ignored
   by the emulator; real GCS answers 412 / 304. Patched.
4. The same GET with a suffix range ``Range: bytes=-N`` or a start beyond
   the end: the emulator ignores the former (200, whole object) and answers
   the latter with an invalid ``Content-Range: bytes 20-9/10``; real GCS
   serves the last N bytes, and 416 for the latter. Patched.
5. ``GET /storage/v1/b/B/o?startOffset=S&endOffset=E`` (tensorstore's listing
   of a key range): the emulator ignores both and returns every object of the
   bucket. Patched: items outside [S, E) are dropped.

6. Not a request but a cost: every change re-serialises the metadata of every
   object to an in-memory file that ``--in-memory`` never reads back (seconds
   per request once a few thousand objects exist). Skipped.

Uploads with ``ifGenerationMatch`` (OCDBT's conditional manifest writes) are
honoured too (412 on a mismatch), as real GCS does.
"""

from __future__ import annotations

import json
import re
import sys
from http import HTTPStatus


def _generation(obj: dict) -> str:
  return str(obj.get("generation") or "0")


def _precondition(request, current: dict | None) -> HTTPStatus | None:
  """412/304 when ifGenerationMatch / ifGenerationNotMatch do not hold (``current``: the object or None)."""
  gen = _generation(current) if current is not None else "0"
  match = request.query.get("ifGenerationMatch")
  if match and match[0] != gen:
    return HTTPStatus.PRECONDITION_FAILED
  not_match = request.query.get("ifGenerationNotMatch")
  if not_match and current is not None and not_match[0] == gen:
    return HTTPStatus.NOT_MODIFIED
  return None


def patch() -> None:
  """Applies the fixes to the emulator's handlers (before its server module builds its route table)."""
  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects

  media_upload, download, ls, insert = objects._media_upload, objects.download, objects.ls, objects.insert

  def fixed_media_upload(request, response, storage):
    if request.data is None:  # 1: an empty body is an empty object
      request._data = b""
    return media_upload(request, response, storage)

  def current_obj(storage, bucket, name):
    try:
      return storage.get_file_obj(bucket, name)
    except NotFound:
      return None

  def fixed_insert(request, response, storage, *args, **kwargs):
    name = (request.query.get("name") or [None])[0]
    if name is not None and request.query.get("ifGenerationMatch"):
      status = _precondition(request, current_obj(storage, request.params["bucket_name"], name))
      if status is not None:
        response.status = status
        return None
    return insert(request, response, storage, *args, **kwargs)

  def fixed_download(request, response, storage, *args, **kwargs):
    obj = current_obj(storage, request.params["bucket_name"], request.params["object_id"])
    if obj is not None:
      status = _precondition(request, obj)  # 3
      if status is not None:
        response.status = status
        return None
      size = int(obj.get("size") or 0)
      rng = request.get_header("range", None)
      m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", rng or "")
      if m and not m.group(1) and m.group(2):  # 4: suffix range
        start = max(0, size - int(m.group(2)))
        del request._request_handler.headers["range"]
        request._request_handler.headers["Range"] = f"bytes={start}-"
      elif m and m.group(1) and int(m.group(1)) >= size > 0:  # 4: start beyond the end
        response.status = HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE
        response["Content-Range"] = f"bytes */{size}"
        return None
    out = download(request, response, storage, *args, **kwargs)
    if obj is not None:  # 2
      response["x-goog-generation"] = _generation(obj)
      response["x-goog-metageneration"] = str(obj.get("metageneration") or "1")
    return out

  def fixed_ls(request, response, storage, *args, **kwargs):
    out = ls(request, response, storage, *args, **kwargs)
    start = (request.query.get("startOffset") or [""])[0]
    end = (request.query.get("endOffset") or [None])[0]
    if response.status == HTTPStatus.OK and (start or end):  # 5
      body = json.loads(response._content)
      body["items"] = [i for i in body.get("items") or [] if start <= i["name"] and (end is None or i["name"] < end)]
      response._content = json.dumps(body)
    return out

  objects._media_upload = fixed_media_upload
  objects.insert = fixed_insert
  objects.download = fixed_download
  objects.ls = fixed_ls

  # 6 (speed, not behaviour): after every change the emulator serialises the metadata of EVERY object of every
  # bucket to an in-memory ".meta" file it never reads back in --in-memory mode: O(objects) per request, so a
  # few hundred uploads took ~30 s. Skipped (the in-memory dicts stay the truth).
  from gcp_storage_emulator import storage as storage_mod

  storage_mod.Storage._write_config_to_file = lambda self: None

  # (after the handlers: the server module builds its route table from them when imported)
  # Python's http.server sends the headers and the body in two writes; with Nagle's algorithm on, each
  # response then waits for the client's delayed ACK (~40 ms a request). Real servers don't.
  from gcp_storage_emulator import server

  server.RequestHandler.disable_nagle_algorithm = True
  # The emulator serves one request at a time from http.server.HTTPServer, whose listen backlog is 5: with more
  # clients connecting at once (tensorstore keeps up to 32 requests in flight) the kernel drops the extra
  # connection attempts and each client waits 1 s for its SYN retry. Real GCS accepts them: a deep backlog.
  import http.server

  http.server.HTTPServer.request_queue_size = 256


def main(argv: list[str]) -> None:
  patch()
  from gcp_storage_emulator.__main__ import main as emulator_main

  emulator_main(["start", "--in-memory", "--quiet", *argv])


if __name__ == "__main__":
  main(sys.argv[1:])
