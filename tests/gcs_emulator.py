"""Offline ``gs://`` for tests: an in-memory GCS emulator on 127.0.0.1.

Usage in a test module::

    pytest.importorskip("gcp_storage_emulator")
    from gcs_emulator import gcs_bucket  # noqa: F401  (pytest fixture)

    def test_something(gcs_bucket):
        path = epath.Path(f"gs://{gcs_bucket}/dir/file")
        ...

or, outside pytest::

    with running_emulator() as emu:
        emu.make_bucket("my-bucket")
        ...  # gs://my-bucket/... now talks to emu.endpoint

What :func:`running_emulator` does:

* starts ``gcp-storage-emulator`` (in-memory storage, thread in this process)
  on a free port of 127.0.0.1 (the OS picks it: no port races);
* sets, and on exit restores, the environment variables every gs:// client in
  the stack reads (see :func:`emulator_env`):

  ==================================  ====================================
  STORAGE_EMULATOR_HOST               gcsfs, etils.epath, google-cloud-storage
  TENSORSTORE_GCS_HTTP_URL            tensorstore ``gcs`` kvstore (Orbax arrays)
  GOOGLE_AUTH_TOKEN_FOR_TESTING       tensorstore: fixed token, no ADC probing
  CLOUD_STORAGE_EMULATOR_ENDPOINT     google-cloud-cpp (array_record gs:// reads)
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT   ``false``: else gcsfs exports its zonal/HNS
                                      filesystem, which queries the storage
                                      control API per bucket (stalls ~60 s)
  EPATH_USE_TF                        ``false``: epath goes through fsspec
  ==================================  ====================================

  and makes gcsfs connect anonymously (``fsspec.config.conf``: no ~1 s
  credential probing per filesystem) with its plain ``GCSFileSystem`` class
  even if gcsfs was imported before the variable was set (undone on exit);
* drops every cached filesystem / client (gcsfs instance cache and listing
  cache, etils.epath's fsspec cache, Orbax's cached GCS buckets) on entry and
  on exit, so the next emulator's port is picked up.

Fixes applied to the stock emulator (process-wide monkeypatch of its route
table, idempotent, see :func:`patch_emulator`):

* object reads/writes answer with ``x-goog-generation`` /
  ``x-goog-metageneration`` / ``x-goog-stored-content-length`` headers
  (tensorstore takes the object generation from ``x-goog-generation``);
* generation preconditions are honoured: ``ifGenerationMatch``
  (``=0`` means "only if absent": 412 when the object exists),
  ``ifGenerationNotMatch`` (304 on reads, 412 on writes) and the
  metageneration variants, on media/multipart/resumable uploads, reads,
  deletes, patches, copies and composes (tensorstore/Orbax rely on them);
* ``Range: bytes=-N`` (suffix) and out-of-range (416) requests are served
  like GCS does (google-cloud-cpp's ``ReadLast``, as used by array_record's
  footer read, happens to cope with the stock full-body answer too);
* object listings honour ``startOffset`` / ``endOffset`` (tensorstore list
  and ``DeleteRange``);
* requests are accepted concurrently (threaded server, large backlog) but
  handled one at a time under a lock, so precondition checks are atomic;
* a handler crash is answered with a non-retriable 400 and recorded in
  ``emulator.errors``, so clients fail fast instead of retrying for minutes.

Fixture scope: ``gcs_bucket`` is *function*-scoped and self-contained: each
test gets its own emulator and a fresh, empty bucket (starting one costs a
few milliseconds), so no state leaks between tests and importing
``gcs_bucket`` alone is enough. ``gcs_emulator`` (also function-scoped)
yields the :class:`Emulator` itself with one bucket already created
(``emulator.bucket``). Both fail the test at teardown if an emulator handler
crashed and abort the process (with all stacks) if a test hangs: see
:func:`hang_guard`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import threading
import traceback
import uuid
from http import HTTPStatus
from http import server as http_server
from typing import Iterator, Optional

import pytest

logger = logging.getLogger(__name__)

_HOST = "127.0.0.1"
_TOKEN = "gcs-emulator-test-token"


# --------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------


def emulator_env(endpoint: str) -> dict[str, str]:
    """Environment variables pointing every gs:// client at ``endpoint``."""
    return {
        "STORAGE_EMULATOR_HOST": endpoint,
        "TENSORSTORE_GCS_HTTP_URL": endpoint,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": _TOKEN,
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": endpoint,
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "EPATH_USE_TF": "false",
    }


@contextlib.contextmanager
def _patched_environ(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def clear_gs_client_caches() -> None:
    """Forget cached gs:// filesystems/clients so a new endpoint is used."""
    import sys

    gcsfs = sys.modules.get("gcsfs")
    if gcsfs is not None:
        from gcsfs import core as gcsfs_core

        for cls in {gcsfs.GCSFileSystem, gcsfs_core.GCSFileSystem}:
            for inst in list(getattr(cls, "_cache", {}).values()):
                with contextlib.suppress(Exception):
                    inst.invalidate_cache()
            cls.clear_instance_cache()
    backend = sys.modules.get("etils.epath.backend")
    if backend is not None:
        backend._FileSystemSpecBackend._get_filesystem.cache_clear()
    gpath = sys.modules.get("etils.epath.gpath")
    if gpath is not None:
        for name in ("_is_tf_installed", "_is_zonal_gcs_bucket"):
            fn = getattr(gpath, name, None)
            if hasattr(fn, "cache_clear"):
                fn.cache_clear()
    orbax_gcs = sys.modules.get("orbax.checkpoint._src.path.gcs_utils")
    if orbax_gcs is not None and hasattr(orbax_gcs.get_bucket, "cache_clear"):
        orbax_gcs.get_bucket.cache_clear()


@contextlib.contextmanager
def _gcsfs_anonymous_core() -> Iterator[None]:
    """gcsfs: anonymous credentials, plain (non zonal/HNS) filesystem class."""
    import fsspec
    import fsspec.config
    from fsspec.registry import _registry as registry  # to undo registrations

    # Must come after GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false is set: gcsfs
    # picks its filesystem class when first imported.
    from gcsfs import core as gcsfs_core

    protos = ("gs", "gcs")
    saved_conf = {p: fsspec.config.conf.get(p) for p in protos}
    saved_reg = {p: registry.get(p) for p in protos}
    for p in protos:
        conf = dict(saved_conf[p] or {})
        conf["token"] = "anon"
        fsspec.config.conf[p] = conf
        # If gcsfs was imported before the env var was set, it exported the
        # experimental ExtendedGcsFileSystem as gcsfs.GCSFileSystem: force the
        # plain one.
        fsspec.register_implementation(p, gcsfs_core.GCSFileSystem, clobber=True)
    try:
        yield
    finally:
        for p in protos:
            if saved_conf[p] is None:
                fsspec.config.conf.pop(p, None)
            else:
                fsspec.config.conf[p] = saved_conf[p]
            if saved_reg[p] is None:
                registry.pop(p, None)
            else:
                registry[p] = saved_reg[p]


# --------------------------------------------------------------------------
# Emulator fixes (monkeypatch of gcp_storage_emulator's route table)
# --------------------------------------------------------------------------

_PATCH_LOCK = threading.Lock()
_PATCHED = False


class _PreconditionFailed(Exception):
    def __init__(self, status: HTTPStatus):
        super().__init__(status.phrase)
        self.status = status


def _live_object(storage, bucket: str, name: str) -> Optional[dict]:
    return (storage.objects.get(bucket) or {}).get(name)


def _q(request, key: str) -> Optional[str]:
    values = request.query.get(key)
    return values[0] if values else None


def _target_object(kind: str, request, storage) -> Optional[tuple[str, str]]:
    """(bucket, object name) a request reads or writes, else None."""
    params = request.params or {}
    if kind in ("copy", "rewrite"):
        return params["dest_bucket_name"], params["dest_object_id"]
    if kind == "upload_partial" or (kind == "insert" and _q(request, "upload_id")):
        pending = storage.resumable.get(_q(request, "upload_id"))
        if pending is None:
            return None
        return pending["bucket"], pending["name"]
    if kind == "insert":
        name = _q(request, "name")
        if name is None:
            data = request.data
            if isinstance(data, dict):
                name = (data.get("meta") or {}).get("name") or data.get("name")
        return (params["bucket_name"], name) if name else None
    if "object_id" in params and kind != "ls":
        return params["bucket_name"], params["object_id"]
    return None


def _condition(request, query_key: str, header_key: str) -> Optional[int]:
    value = _q(request, query_key)
    if value is None:
        value = request.get_header(header_key)
    return None if value is None else int(value)


def _check_preconditions(request, obj: Optional[dict]) -> None:
    """Raise _PreconditionFailed like GCS would for the request's conditions."""
    is_read = request.method == "GET"
    # Reads and deletes of a missing object answer 404 whatever the condition.
    missing_is_404 = request.method in ("GET", "DELETE", "PATCH")
    generation = int(obj["generation"]) if obj else 0
    metageneration = int(obj["metageneration"]) if obj else None

    want = _condition(request, "ifGenerationMatch", "x-goog-if-generation-match")
    if want is not None and want != generation:
        if not (obj is None and missing_is_404):
            raise _PreconditionFailed(HTTPStatus.PRECONDITION_FAILED)
    unwanted = _condition(request, "ifGenerationNotMatch", "x-goog-if-generation-not-match")
    if unwanted is not None and obj is not None and unwanted == generation:
        raise _PreconditionFailed(
            HTTPStatus.NOT_MODIFIED if is_read else HTTPStatus.PRECONDITION_FAILED
        )
    want = _condition(request, "ifMetagenerationMatch", "x-goog-if-metageneration-match")
    if want is not None and want != metageneration:
        if not (obj is None and missing_is_404):
            raise _PreconditionFailed(HTTPStatus.PRECONDITION_FAILED)
    unwanted = _condition(
        request, "ifMetagenerationNotMatch", "x-goog-if-metageneration-not-match"
    )
    if unwanted is not None and obj is not None and unwanted == metageneration:
        raise _PreconditionFailed(
            HTTPStatus.NOT_MODIFIED if is_read else HTTPStatus.PRECONDITION_FAILED
        )


def _set_object_headers(response, obj: dict) -> None:
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration") or 1)
    response["x-goog-stored-content-length"] = str(obj.get("size") or 0)
    response["x-goog-stored-content-encoding"] = obj.get("contentEncoding") or "identity"
    response["x-goog-storage-class"] = obj.get("storageClass") or "STANDARD"


def _error(response, status: HTTPStatus, reason: str, message: str) -> None:
    response.status = status
    response.json(
        {
            "error": {
                "code": status.value,
                "message": message,
                "errors": [{"domain": "global", "reason": reason, "message": message}],
            }
        }
    )


def _filter_listing(request, response) -> None:
    """Apply startOffset/endOffset (ignored by the stock ls) to a listing."""
    start, end = _q(request, "startOffset"), _q(request, "endOffset")
    if (start is None and end is None) or response.status != HTTPStatus.OK:
        return
    body = json.loads(response._content)

    def keep(name: str) -> bool:
        return (start is None or name >= start) and (end is None or name < end)

    body["items"] = [o for o in body.get("items") or [] if keep(o["name"])]
    body["prefixes"] = [p for p in body.get("prefixes") or [] if keep(p)]
    response.json(body)


_RANGE = re.compile(r"^\s*bytes=(?:(?P<start>\d+)-(?P<end>\d*)|-(?P<suffix>\d+))\s*$")


def _download(request, response, storage, *args, **kwargs):
    """objects.download with suffix ranges and 416, like GCS."""
    from gcp_storage_emulator.exceptions import NotFound

    bucket, name = request.params["bucket_name"], request.params["object_id"]
    try:
        content = storage.get_file(bucket, name)
        obj = storage.get_file_obj(bucket, name)
    except NotFound:
        response.status = HTTPStatus.NOT_FOUND
        return
    size = len(content)
    match = _RANGE.match(request.get_header("range") or "")
    if match:
        if match["suffix"] is not None:
            first, last = max(0, size - int(match["suffix"])), size - 1
        else:
            first = int(match["start"])
            last = min(size - 1, int(match["end"])) if match["end"] else size - 1
        if size and first >= size:
            response["Content-Range"] = f"bytes */{size}"
            _error(response, HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE,
                   "requestedRangeNotSatisfiable", "The requested range cannot be satisfied.")
            return
        if size:
            content = content[first:last + 1]
            response["Content-Range"] = f"bytes {first}-{last}/{size}"
            response.status = HTTPStatus.PARTIAL_CONTENT
    response["X-Goog-Hash"] = f"crc32c={obj['crc32c']},md5={obj['md5Hash']}"
    if "response-content-disposition" in request.query:
        response["Content-Disposition"] = request.query["response-content-disposition"][0]
    for key, value in (obj.get("metadata") or {}).items():
        if value is not None:
            response[f"x-goog-meta-{key}"] = str(value)
    response.write_file(content, content_type=obj.get("contentType"))


def _wrap_handler(kind: str, handler, errors: list):
    """Add preconditions, generation headers and crash reporting to a handler."""

    @functools.wraps(handler)
    def wrapped(request, response, storage, *args, **kwargs):
        try:
            target = _target_object(kind, request, storage)
            if target is not None:
                try:
                    _check_preconditions(request, _live_object(storage, *target))
                except _PreconditionFailed as failure:
                    request.data  # drain the body before answering
                    if failure.status == HTTPStatus.NOT_MODIFIED:
                        response.status = failure.status
                    else:
                        _error(response, failure.status, "conditionNotMet",
                               "At least one of the pre-conditions you specified did not hold.")
                    return
            handler(request, response, storage, *args, **kwargs)
            if kind == "ls":
                _filter_listing(request, response)
            if target is not None and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
                obj = _live_object(storage, *target)
                if obj is not None:
                    _set_object_headers(response, obj)
        except Exception as exc:  # answer, don't drop the connection
            errors.append(f"{request.method} {request.path}: {exc!r}")
            logger.error("gcs emulator: %s %s failed:\n%s", request.method,
                         request.full_url, traceback.format_exc())
            response._headers.clear()
            _error(response, HTTPStatus.BAD_REQUEST, "emulatorError",
                   f"gcs emulator handler crashed: {exc!r}")

    wrapped._gcs_emulator_kind = kind
    return wrapped


# Crashes of patched handlers, whichever emulator instance served them.
_HANDLER_ERRORS: list = []


def patch_emulator() -> None:
    """Install the fixes above into gcp_storage_emulator (idempotent)."""
    global _PATCHED
    with _PATCH_LOCK:
        if _PATCHED:
            return
        from gcp_storage_emulator import server
        from gcp_storage_emulator.handlers import objects

        objects.download = _download  # objects.get(alt=media) calls it
        wrapped = {}

        def wrap(fn):
            if fn not in wrapped:
                kind = "download" if fn is _download else fn.__name__
                if fn.__module__.endswith(".buckets"):
                    kind = "bucket_" + kind
                wrapped[fn] = _wrap_handler(kind, fn, _HANDLER_ERRORS)
            return wrapped[fn]

        table = []
        for regex, methods in server.HANDLERS:
            methods = {
                m: wrap(_download if fn.__name__ == "download" else fn)
                for m, fn in methods.items()
            }
            table.append((regex, methods))
        server.HANDLERS = tuple(table)
        # Router.handle falls back to objects.insert for some upload URLs.
        objects.insert = wrap(objects.insert)
        # The stock emulator logs every 404 (normal for tensorstore/Orbax
        # probing) at ERROR level; crashes are reported by _wrap_handler.
        for name in ("gcp_storage_emulator", "api.object", "api.bucket"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        _PATCHED = True


# --------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------


class _ThreadingServer(http_server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # tensorstore opens many connections at once

    def handle_error(self, request, client_address):
        import sys

        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # client went away (e.g. cancelled request): not our problem
        super().handle_error(request, client_address)


def _make_handler_class():
    from gcp_storage_emulator import server

    class Handler(server.RequestHandler):
        # HTTP/1.0: one request per connection, so an unread request body can
        # never be mistaken for the next request.
        def _serialized(self, method):
            with self.server.lock:
                server.Router(self).handle(method)

        def do_GET(self):
            self._serialized(server.GET)

        def do_POST(self):
            self._serialized(server.POST)

        def do_PUT(self):
            self._serialized(server.PUT)

        def do_DELETE(self):
            self._serialized(server.DELETE)

        def do_PATCH(self):
            self._serialized(server.PATCH)

    return Handler


class Emulator:
    """A running in-memory emulator; see :func:`running_emulator`."""

    def __init__(self):
        from gcp_storage_emulator.storage import Storage

        patch_emulator()
        self.storage = Storage(use_memory_fs=True)
        self._errors_start = len(_HANDLER_ERRORS)
        handler = _make_handler_class()
        self._httpd = _ThreadingServer(
            (_HOST, 0), functools.partial(handler, self.storage)
        )
        self._httpd.lock = threading.Lock()
        self.port = self._httpd.server_address[1]
        self.endpoint = f"http://{_HOST}:{self.port}"
        self.bucket: Optional[str] = None
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"gcs-emulator-{self.port}",
            daemon=True,
        )

    @property
    def errors(self) -> list:
        """Handler crashes seen since this emulator started."""
        return _HANDLER_ERRORS[self._errors_start:]

    def start(self) -> "Emulator":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def make_bucket(self, name: Optional[str] = None) -> str:
        """Create a bucket (random name by default) and return its name."""
        from gcp_storage_emulator.handlers import buckets

        name = name or f"test-{uuid.uuid4().hex[:16]}"
        with self._httpd.lock:
            buckets.create_bucket(name, self.storage)
        return name

    def wipe(self, keep_buckets: bool = True) -> None:
        with self._httpd.lock:
            self.storage.wipe(keep_buckets=keep_buckets)


@contextlib.contextmanager
def running_emulator() -> Iterator[Emulator]:
    """Run an emulator and point all gs:// clients at it for the duration."""
    emulator = Emulator().start()
    try:
        with _patched_environ(emulator_env(emulator.endpoint)):
            with _gcsfs_anonymous_core():
                clear_gs_client_caches()
                try:
                    yield emulator
                finally:
                    clear_gs_client_caches()
    finally:
        emulator.stop()


@contextlib.contextmanager
def hang_guard(seconds: Optional[float] = None) -> Iterator[None]:
    """Abort the process with all thread stacks if the block runs too long.

    A gs:// client that cannot reach its endpoint retries (tensorstore: ~32
    times with backoff up to 32 s) or waits forever; this turns that into a
    loud failure. Uses ``faulthandler.dump_traceback_later(exit=True)``, so
    it needs no pytest plugin; under pytest-xdist only the worker dies.
    Default: $GCS_EMULATOR_TEST_TIMEOUT or 120 s; 0 disables.
    """
    import faulthandler

    if seconds is None:
        seconds = float(os.environ.get("GCS_EMULATOR_TEST_TIMEOUT", "120"))
    if seconds <= 0:
        yield
        return
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def _check_no_crashes(emulator: Emulator) -> None:
    if emulator.errors:
        pytest.fail("gcs emulator handler crashed:\n" + "\n".join(emulator.errors))


@pytest.fixture
def gcs_emulator() -> Iterator[Emulator]:
    """Function-scoped: a private emulator with one fresh bucket (``.bucket``).

    Fails the test at teardown if an emulator handler crashed, and aborts the
    process if the test hangs (see :func:`hang_guard`).
    """
    with hang_guard(), running_emulator() as emulator:
        emulator.bucket = emulator.make_bucket()
        yield emulator
        _check_no_crashes(emulator)


@pytest.fixture
def gcs_bucket() -> Iterator[str]:
    """Function-scoped: name of a fresh bucket on a private, running emulator.

    Environment variables and client caches are set for the duration of the
    test, so ``gs://<name>/...`` works with epath, gcsfs, tensorstore/Orbax,
    google-cloud-storage and array_record. Same teardown checks and hang
    guard as :func:`gcs_emulator`.
    """
    with hang_guard(), running_emulator() as emulator:
        yield emulator.make_bucket()
        _check_no_crashes(emulator)
