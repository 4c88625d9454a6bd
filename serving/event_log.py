"""Append-only JSON-lines logs per ds with group-committed fsync.

Used for the impression log (``<impression_log_dir>/ds=D/impressions-*.jsonl``, one
contracts.IMPRESSIONS row per line, read by ``keyart job ingest``) and the reward log
(``<lake>/raw/rewards/ds=D/rewards-*.jsonl``).

Durability policy (``serve_log_fsync``):

``always`` (default)
    A request's lines are written and ``fdatasync``-ed before the request is answered.
    Concurrent requests share one write + one fsync (group commit): a dedicated writer
    thread takes everything queued while the previous fsync ran. An acknowledged decision
    survives kill -9, an OS crash and power loss: no loss window.
``interval``
    A request is answered once its lines are written to the file (the OS page cache);
    fsync runs at most every ``serve_log_fsync_interval_ms``. An acknowledged decision
    survives kill -9 of the server; an OS crash or power loss can lose the last
    ``serve_log_fsync_interval_ms`` of acknowledged decisions.

A request's lines go out in one ``write`` to an ``O_APPEND`` file, so a file never holds
a partial line unless the machine stops mid-write; ingest quarantines such a line. Files
are named per process (``<prefix>-<host>-<pid>-<start>-<seq>.jsonl``), so several workers
never interleave, and rotate at ``max_bytes`` and when the ds changes. Each new file and
folder is made durable by fsyncing its directory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("keyart.serving.event_log")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Waiter:
    """A request waiting for its lines: an asyncio future or a threading event."""

    __slots__ = ("loop", "future", "event", "error")

    def __init__(self, loop: asyncio.AbstractEventLoop | None, future: asyncio.Future | None):
        self.loop, self.future = loop, future
        self.event = threading.Event() if future is None else None
        self.error: BaseException | None = None


def _resolve(waiters: list[_Waiter]) -> None:
    for w in waiters:
        if w.future is not None and not w.future.done():
            if w.error is None:
                w.future.set_result(None)
            else:
                w.future.set_exception(w.error)


class JsonlLog:
    """A per-ds JSON-lines log with one writer thread doing group commit."""

    def __init__(self, root: Path, prefix: str, fsync: str = "always", fsync_interval_ms: int = 5,
                 max_bytes: int = 256 << 20):
        if fsync not in ("always", "interval"):
            raise ValueError(f"fsync must be 'always' or 'interval', got {fsync!r}")
        self.root = Path(root)
        self.prefix = prefix
        self.fsync = fsync
        self.fsync_interval = fsync_interval_ms / 1000.0
        self.max_bytes = max_bytes
        self._tag = f"{socket.gethostname()}-{os.getpid()}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
        self._seq = 0
        self._files: dict[str, tuple[int, Path, int]] = {}  # ds -> (fd, path, size)
        self._queue: list[tuple[str, bytes, _Waiter]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._dirty: set[int] = set()
        self._last_fsync = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"keyart-{prefix}-log", daemon=True)
        self._thread.start()
        self.commits = 0
        self.lines_written = 0

    # -- producer side -------------------------------------------------------------------
    async def append(self, ds: str, lines: bytes) -> None:
        """Queue ``lines`` (whole JSON lines) for day ``ds``; return once durable per the policy."""
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop, loop.create_future())
        self._put(ds, lines, waiter)
        await waiter.future

    def append_sync(self, ds: str, lines: bytes) -> None:
        """Blocking :meth:`append` for threads without an event loop."""
        waiter = _Waiter(None, None)
        self._put(ds, lines, waiter)
        waiter.event.wait()
        if waiter.error is not None:
            raise waiter.error

    def _put(self, ds: str, lines: bytes, waiter: _Waiter) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError(f"{self.prefix} log is closed")
            self._queue.append((ds, lines, waiter))
            self._cond.notify()

    # -- writer thread -------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    timeout = None
                    if self._dirty:  # interval mode: fsync what is written when the interval is up
                        timeout = max(0.0, self._last_fsync + self.fsync_interval - time.monotonic())
                        if timeout == 0.0:
                            break
                    self._cond.wait(timeout)
                batch, self._queue = self._queue, []
                closing = self._closed and not batch
            if batch:
                self._commit(batch)
            elif self._dirty:
                self._sync_dirty()
            if closing:
                self._sync_dirty()
                return

    def _commit(self, batch: list[tuple[str, bytes, _Waiter]]) -> None:
        by_ds: dict[str, list[bytes]] = {}
        for ds, lines, _ in batch:
            by_ds.setdefault(ds, []).append(lines)
        error: BaseException | None = None
        try:
            for ds, chunks in by_ds.items():
                fd = self._fd_for(ds)
                data = b"".join(chunks)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                fd_, path, size = self._files[ds]
                self._files[ds] = (fd_, path, size + len(data))
                self._dirty.add(fd)
            if self.fsync == "always" or time.monotonic() - self._last_fsync >= self.fsync_interval:
                self._sync_dirty()
            self.commits += 1
            self.lines_written += sum(c.count(b"\n") for _, c, _ in batch)
        except BaseException as exc:  # disk full, permissions: no request may be acknowledged
            log.error("%s log write failed: %s", self.prefix, exc)
            error = exc
        waiters = [w for _, _, w in batch]
        by_loop: dict[asyncio.AbstractEventLoop, list[_Waiter]] = {}
        for w in waiters:
            w.error = error
            if w.event is not None:
                w.event.set()
            else:
                by_loop.setdefault(w.loop, []).append(w)
        for loop, ws in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, ws)
            except RuntimeError:  # loop already closed at shutdown
                pass

    def _sync_dirty(self) -> None:
        for fd in list(self._dirty):
            os.fdatasync(fd)
        self._dirty.clear()
        self._last_fsync = time.monotonic()

    def _fd_for(self, ds: str) -> int:
        entry = self._files.get(ds)
        if entry is not None and entry[2] < self.max_bytes:
            return entry[0]
        if entry is not None:  # rotate
            self._close_fd(entry[0])
        for other in [d for d in self._files if d != ds]:
            # a newer day started: older days' files are complete
            if other < ds:
                self._close_fd(self._files.pop(other)[0])
        folder = self.root / f"ds={ds}"
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            _fsync_dir(folder.parent)
        self._seq += 1
        path = folder / f"{self.prefix}-{self._tag}-{self._seq:04d}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        _fsync_dir(folder)
        self._files[ds] = (fd, path, 0)
        return fd

    def _close_fd(self, fd: int) -> None:
        if fd in self._dirty:
            os.fdatasync(fd)
            self._dirty.discard(fd)
        os.close(fd)

    def close(self) -> None:
        """Flush, fsync and close every file; later appends fail."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)
        for fd, _, _ in self._files.values():
            self._close_fd(fd)
        self._files.clear()

    def paths(self) -> Iterable[Path]:
        return [p for _, p, _ in self._files.values()]
