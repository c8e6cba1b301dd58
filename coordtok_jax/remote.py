"""Remote paths (gs://, s3://) answer quickly or fail with one line: without a check, a path whose
endpoint is unreachable (no network, no credentials) can hang for minutes in retries or print
pages of tracebacks before anything useful happens."""

from __future__ import annotations

import os

from etils import epath

from coordtok_jax.errors import UserError


class RemoteError(UserError, OSError):
    """A remote path that cannot be reached; the message names it and the cause."""


REMOTE_TIMEOUT_S = 30.0


def check_reachable(path, what: str, timeout: float = REMOTE_TIMEOUT_S) -> None:
    """For a gs:// (or other remote) path: one metadata call must answer within `timeout` seconds,
    else RemoteError names the path and the cause (no network, no credentials, no such bucket);
    without this a missing endpoint can hang for minutes or print pages of retries. Local paths
    return at once."""
    import threading

    text = os.fspath(path)
    if "://" not in text:
        return
    outcome: dict = {}

    def probe():
        try:
            outcome["exists"] = epath.Path(text).exists()
        except Exception as e:  # noqa: BLE001 - reported below
            outcome["error"] = e

    # a daemon thread: a call stuck in retries must not keep the process alive at exit
    worker = threading.Thread(target=probe, name="check_reachable", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise RemoteError(f"{what} {text}: no answer from the storage service within {timeout:.0f} s "
                          f"(no network, or no credentials: `gcloud auth application-default login`)")
    if "error" in outcome:
        e = outcome["error"]
        cause = " ".join(str(e).split())[:300]
        raise RemoteError(f"{what} {text}: cannot be reached ({type(e).__name__}: {cause})") from None
