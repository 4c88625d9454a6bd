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

Line format: every line is the JSON object the caller gave with its CRC-32 first,
``{"_crc32":"<8 lower-case hex digits>",<the object's other bytes>``; the checksum is
``zlib.crc32`` of the object as given (``{`` + everything after the 21-byte prefix), so
:func:`unframe` (and ``keyart job ingest``) rebuild those bytes exactly and verify them.
A reader that ignores the checksum still sees the row, plus one ``_crc32`` key.

Torn tails: a batch goes out in ``write`` calls to an ``O_APPEND`` file. If a write fails
part-way (disk full, I/O error) the file is truncated back to its size before the batch
(and fsynced) before anyone is answered, so it ends on a whole line and the next
acknowledged line is never glued to a fragment; if even the truncate fails the file is
abandoned and the next batch starts a new one. A file this process opens that already
exists (a restart that reuses the name) is cut back to its last newline first. A machine
crash mid-write can still leave a partial last line in a file no process appends to any
more: it was never acknowledged, and ingest quarantines it ("checksum mismatch" or
"malformed JSON"). Files are named per process
(``<prefix>-<host>-<pid>-<start>-<seq>.jsonl``), so several workers never interleave, and
rotate at ``max_bytes`` and when the ds changes. Each new file and folder is made durable
by fsyncing its directory.

Health (:meth:`JsonlLog.health`, used by ``/readyz``): the log is unhealthy for
``failure_hold_s`` after a failed write, and while its directory cannot be written (a
probe file is created and removed) or its file system has less than ``min_free_bytes``
free.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import threading
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

log = logging.getLogger("keyart.serving.event_log")

CRC_FIELD = "_crc32"
_CRC_HEAD = b'{"_crc32":"'
_CRC_PREFIX = len(_CRC_HEAD) + 8 + 2  # {"_crc32":"xxxxxxxx",
_HEX8 = re.compile(rb"[0-9a-f]{8}")


def frame(payload: bytes) -> bytes:
    """One JSON object (a non-empty ``{"...}``, no newline) as a log line with its checksum."""
    if payload[:2] != b'{"' or b"\n" in payload or payload.startswith(_CRC_HEAD):
        raise ValueError(f"a log line must be one non-empty JSON object without newlines, got {payload[:40]!r}")
    return b'{"_crc32":"%08x",' % zlib.crc32(payload) + payload[1:]


def frame_lines(lines: bytes | Sequence[bytes]) -> bytes:
    """Newline-separated JSON objects, or a sequence of them (one object each, no newline)
    -> framed lines, each ending in a newline."""
    out = []
    crc = zlib.crc32
    for x in (lines.split(b"\n") if isinstance(lines, bytes | bytearray) else lines):
        if not x:
            continue
        if x[:2] != b'{"' or x.startswith(_CRC_HEAD) or (b"\n" in x):
            frame(x)  # raises with the reason
        out.append(b'{"_crc32":"%08x",%s\n' % (crc(x), x[1:]))
    return b"".join(out)


def unframe(line: bytes) -> bytes | None:
    """The object a log line carries: checksum verified (None if it does not match or the
    line is torn); a line without a checksum (written before checksums) is returned as is."""
    line = line.rstrip(b"\r\n")
    if not line.startswith(_CRC_HEAD):
        return line
    if len(line) <= _CRC_PREFIX or line[_CRC_PREFIX - 2:_CRC_PREFIX] != b'",':
        return None
    digits = line[len(_CRC_HEAD):_CRC_PREFIX - 2]
    if not _HEX8.fullmatch(digits):
        return None
    payload = b"{" + line[_CRC_PREFIX:]
    return payload if zlib.crc32(payload) == int(digits, 16) else None


def read_lines(path: Path) -> Iterator[bytes | None]:
    """Every non-blank line of a log file, unframed (None for a line that fails its checksum)."""
    for line in Path(path).read_bytes().splitlines():
        if line.strip():
            yield unframe(line)


def _cut_torn_tail(fd: int, path: Path, size: int) -> int:
    """Truncate an existing file back to its last newline; return the new size."""
    end = size
    with open(path, "rb") as f:
        while end > 0:
            start = max(0, end - (64 << 10))
            f.seek(start)
            chunk = f.read(end - start)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                end = start + cut + 1
                break
            end = start
    if end != size:
        os.ftruncate(fd, end)
        os.fdatasync(fd)
        log.warning("cut a torn tail of %d bytes from %s", size - end, path)
    return end


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
                 max_bytes: int = 256 << 20, min_free_bytes: int = 8 << 20, failure_hold_s: float = 5.0):
        if fsync not in ("always", "interval"):
            raise ValueError(f"fsync must be 'always' or 'interval', got {fsync!r}")
        self.root = Path(root)
        self.prefix = prefix
        self.fsync = fsync
        self.fsync_interval = fsync_interval_ms / 1000.0
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self.failure_hold_s = failure_hold_s
        self.probe_interval_s = 1.0
        self._tag = f"{socket.gethostname()}-{os.getpid()}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
        self._seq = 0
        self._files: dict[str, tuple[int, Path, int]] = {}  # ds -> (fd, path, size)
        self._opened: dict[Path, int] = {}  # every file this log wrote to -> its size when opened
        self._queue: list[tuple[str, bytes, _Waiter]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._dirty: set[int] = set()
        self._last_fsync = time.monotonic()
        self.commits = 0
        self.lines_written = 0
        self.failures = 0
        self.last_error: str | None = None
        self._last_error_at = 0.0
        self._probe_at = float("-inf")
        self._probe_result: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"keyart-{prefix}-log", daemon=True)
        self._thread.start()

    # -- producer side -------------------------------------------------------------------
    async def append(self, ds: str, lines: bytes | Sequence[bytes]) -> None:
        """Queue ``lines`` (newline-separated JSON objects, or a sequence of them) for day ``ds``; return once
        durable per the policy. Each line is written with its checksum (:func:`frame`)."""
        framed = frame_lines(lines)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop, loop.create_future())
        self._put(ds, framed, waiter)
        await waiter.future

    def append_sync(self, ds: str, lines: bytes | Sequence[bytes]) -> None:
        """Blocking :meth:`append` for threads without an event loop."""
        framed = frame_lines(lines)
        waiter = _Waiter(None, None)
        self._put(ds, framed, waiter)
        waiter.event.wait()
        if waiter.error is not None:
            raise waiter.error

    def _put(self, ds: str, lines: bytes, waiter: _Waiter) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError(f"{self.prefix} log is closed")
            self._queue.append((ds, lines, waiter))
            self._cond.notify()

    # -- health --------------------------------------------------------------------------
    def health(self) -> str | None:
        """None while the log can take writes, else why not (for ``/readyz``)."""
        if self._closed:
            return f"{self.prefix} log is closed"
        if self.last_error is not None and time.monotonic() - self._last_error_at < self.failure_hold_s:
            return f"{self.prefix} log write failed: {self.last_error}"
        now = time.monotonic()
        if now - self._probe_at >= self.probe_interval_s:
            self._probe_result = self._probe()
            self._probe_at = now
        return self._probe_result

    def _probe(self) -> str | None:
        probe = self.root / f".probe-{self.prefix}-{self._tag}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.close(fd)
            os.unlink(probe)
            st = os.statvfs(self.root)
        except OSError as exc:
            return f"{self.prefix} log directory {self.root} is not writable: {exc.strerror or exc}"
        free = st.f_bavail * st.f_frsize
        if free < self.min_free_bytes:
            return f"{self.prefix} log file system is full: {free} bytes free under {self.root}"
        return None

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
                try:
                    self._sync_dirty()
                except OSError as exc:  # interval mode: already acknowledged (the documented window)
                    self._failed(exc)
            if closing:
                try:
                    self._sync_dirty()
                except OSError as exc:
                    self._failed(exc)
                return

    def _failed(self, exc: BaseException) -> None:
        log.error("%s log write failed: %s", self.prefix, exc)
        self.failures += 1
        self.last_error = str(exc) or type(exc).__name__
        self._last_error_at = time.monotonic()

    def _commit(self, batch: list[tuple[str, bytes, _Waiter]]) -> None:
        by_ds: dict[str, list[bytes]] = {}
        for ds, lines, _ in batch:
            by_ds.setdefault(ds, []).append(lines)
        error: BaseException | None = None
        before: dict[str, int] = {}  # ds -> file size before this batch
        try:
            for ds, chunks in by_ds.items():
                fd = self._fd_for(ds)
                data = b"".join(chunks)
                fd_, path, size = self._files[ds]
                before[ds] = size
                self._dirty.add(fd)
                self._write_all(fd, data)
                self._files[ds] = (fd_, path, size + len(data))
            if self.fsync == "always" or time.monotonic() - self._last_fsync >= self.fsync_interval:
                self._sync_dirty()
            self.commits += 1
            self.lines_written += sum(c.count(b"\n") for _, c, _ in batch)
            self.last_error = None
        except BaseException as exc:  # disk full, permissions: no request may be acknowledged
            self._failed(exc)
            self._roll_back(before)
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

    @staticmethod
    def _write_all(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    def _roll_back(self, before: dict[str, int]) -> None:
        """After a failed batch: cut every file it touched back to its size before the batch,
        so each ends on a whole line; a file that cannot be cut back is abandoned (the next
        batch opens a new one, never appending to a fragment)."""
        for ds, size in before.items():
            fd, path, _ = self._files[ds]
            try:
                os.ftruncate(fd, size)
                os.fdatasync(fd)
                self._files[ds] = (fd, path, size)
                self._dirty.discard(fd)
            except OSError as exc:
                log.error("%s log: cannot cut %s back to %d bytes (%s); starting a new file", self.prefix, path, size, exc)
                self._files.pop(ds)
                self._dirty.discard(fd)
                try:
                    os.close(fd)
                except OSError:
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
            del self._files[ds]
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
        self._opened.setdefault(path, 0)  # before it exists: a reader must never take its lines for another's
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size:  # the name was used before (a restart with the same pid in the same second)
                size = _cut_torn_tail(fd, path, size)
            _fsync_dir(folder)
        except BaseException:
            os.close(fd)
            raise
        if self._opened[path] == 0:
            self._opened[path] = size
        self._files[ds] = (fd, path, size)
        return fd

    def own_from(self, path: Path) -> int | None:
        """Where this log's own lines start in ``path`` (what was there before it opened the
        file was written by an earlier process), or None if it never wrote to ``path``."""
        return self._opened.get(Path(path))

    def _close_fd(self, fd: int) -> None:
        try:
            if fd in self._dirty:
                self._dirty.discard(fd)
                os.fdatasync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Flush, fsync and close every file; later appends fail."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)
        for fd, _, _ in self._files.values():
            try:
                self._close_fd(fd)
            except OSError as exc:
                log.error("%s log: closing failed: %s", self.prefix, exc)
        self._files.clear()

    def paths(self) -> Iterable[Path]:
        return [p for _, p, _ in self._files.values()]
