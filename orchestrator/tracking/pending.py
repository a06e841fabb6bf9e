"""Writes to a tracking store that may stop answering: made in order, kept while the store does not answer.

A store that goes away during a study delays the record, not the training. A write that fails because the store
did not answer (connection refused or reset, timeout, HTTP 5xx after retries, a locked SQLite file) stays at the
head of the queue with everything after it; the store is asked again `retry_interval_s` later. A write the store
refuses is an error: the study stops. The queue is plain data (picklable), so Tune can save it with the experiment.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

import requests
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE, ErrorCode
from mlflow.tracking import MlflowClient

# MLflow's HTTP client retries a request 7 times with back-off factor 2 and waits 120 s for each answer:
# while a server is down every write would hold Tune's loop for minutes. The driver's writes fail fast
# instead and wait in the pending queue. Uploads of a model may take the server a while to store.
REQUEST_TIMEOUT_S = 10
UPLOAD_TIMEOUT_S = 60
# How often the end of a study asks a store that does not answer again, within its bounded wait.
FINAL_RETRY_PAUSE_S = 5.0
# Errors that say a write did not reach the store, as opposed to the store refusing it.
UNREACHABLE_ERRORS = (
    ConnectionError, requests.exceptions.ConnectionError, requests.exceptions.Timeout, requests.exceptions.RetryError,
)


class Write(Protocol):
    """One write: how long a request of it may take, and what it is, for messages."""

    timeout_s: int

    def describe(self) -> str: ...


@contextmanager
def fail_fast_http(timeout_s: int) -> Iterator[None]:
    """MLflow's HTTP client with one retry and `timeout_s` per request; a user's own MLFLOW_HTTP_REQUEST_* win.

    MLflow reads these variables at every request, so they bind the requests made inside the block only.
    """
    settings = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s),
    }
    added = {key: value for key, value in settings.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _error_chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def store_unavailable(error: BaseException) -> bool:
    """Whether `error` says the tracking store did not answer (down, unreachable, or a SQLite file locked
    by another writer), so that the same write may succeed later."""
    return any(
        isinstance(cause, UNREACHABLE_ERRORS)
        or (isinstance(cause, MlflowException) and cause.error_code == ErrorCode.Name(TEMPORARILY_UNAVAILABLE))
        for cause in _error_chain(error)
    )


def _root_cause(error: BaseException) -> str:
    *_, innermost = _error_chain(error)
    return str(innermost)


class PendingWritesError(ConnectionError):
    """The tracking store did not take the study's pending writes within the wait at the study's end."""


class PendingWrites:
    """The writes not yet made to the store at `tracking_uri`, oldest first."""

    def __init__(self, tracking_uri: str, retry_interval_s: float, final_wait_s: float) -> None:
        self.tracking_uri = tracking_uri
        self._retry_interval_s = retry_interval_s
        self._final_wait_s = final_wait_s
        self.items: list[Write] = []
        # time.monotonic() before which a store that failed is not asked again; None while it answers.
        self._next_attempt: float | None = None

    def add(self, write: Write, apply: Callable[[MlflowClient, Write], None]) -> None:
        self.items.append(write)
        self.flush(apply)

    def defer(self, write: Write) -> None:
        """Keep `write` for the next flush, after the earlier ones, without asking the store now."""
        self.items.append(write)

    def flush(self, apply: Callable[[MlflowClient, Write], None], force: bool = False) -> None:
        """Make the pending writes with `apply`, oldest first, until the store does not answer; a store that did not
        answer is asked again only `retry_interval_s` later, unless `force`."""
        if not self.items or (not force and self._next_attempt is not None and time.monotonic() < self._next_attempt):
            return
        client = MlflowClient(self.tracking_uri)
        while self.items:
            write = self.items[0]
            try:
                with fail_fast_http(write.timeout_s):
                    apply(client, write)
            except Exception as error:
                if not store_unavailable(error):
                    # A write the store refuses would block every later one: the study stops, as on any error.
                    self.items.pop(0)
                    raise
                if self._next_attempt is None:
                    print(
                        f"MLflow: tracking store {self.tracking_uri} does not answer ({_root_cause(error)}); trials "
                        "keep training and their record waits here, to be logged in order once the store answers",
                        flush=True,
                    )
                self._next_attempt = time.monotonic() + self._retry_interval_s
                return
            self.items.pop(0)
        if self._next_attempt is not None:
            print(
                f"MLflow: tracking store {self.tracking_uri} answers again; the pending writes are logged", flush=True
            )
            self._next_attempt = None

    def wait(self, apply: Callable[[MlflowClient, Write], None]) -> None:
        """At the study's end: up to `final_wait_s` for the store to take what is pending, then PendingWritesError
        naming the store and the writes it did not take."""
        if not self.items:
            return
        print(
            f"MLflow: {len(self.items)} writes to {self.tracking_uri} are pending; waiting up to "
            f"{self._final_wait_s:.0f} s for it to answer",
            flush=True,
        )
        deadline = time.monotonic() + self._final_wait_s
        while True:
            self.flush(apply, force=True)
            remaining = deadline - time.monotonic()
            if not self.items or remaining <= 0:
                break
            time.sleep(min(FINAL_RETRY_PAUSE_S, remaining))
        if self.items:
            listed = "; ".join(write.describe() for write in self.items[:10])
            more = f"; and {len(self.items) - 10} more" if len(self.items) > 10 else ""
            raise PendingWritesError(
                f"MLflow tracking store {self.tracking_uri} did not answer within {self._final_wait_s:.0f} s of the "
                f"study's end; {len(self.items)} writes were not logged: {listed}{more}. They are kept in Tune's "
                "saved experiment state: once the store answers, resuming the study (msx launch --resume) logs them."
            )
