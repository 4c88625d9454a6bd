"""The group-committed JSON-lines log: durability policies, grouping, rotation, checksums,
failed writes (disk full mid-write), torn tails, health."""

from __future__ import annotations

import asyncio
import errno
import os
import zlib
from pathlib import Path

import orjson
import pytest

from keyart.serving.event_log import JsonlLog, frame, read_lines, unframe

DS = "2026-03-01"


def read_all(root: Path) -> dict[str, list[dict]]:
    """Rows per partition; every line must pass its checksum."""
    out: dict[str, list[dict]] = {}
    for f in sorted(root.rglob("*.jsonl")):
        for payload in read_lines(f):
            assert payload is not None, f"{f}: a line fails its checksum"
            out.setdefault(f.parent.name, []).append(orjson.loads(payload))
    return out


def row(i: int) -> bytes:
    return orjson.dumps({"i": i, "pad": "x" * 30}) + b"\n"


@pytest.mark.parametrize("fsync", ["always", "interval"])
def test_concurrent_appends_are_grouped_and_all_durable(tmp_path, fsync):
    log = JsonlLog(tmp_path, "impressions", fsync=fsync, fsync_interval_ms=5)

    async def main() -> None:
        await asyncio.gather(*(log.append(DS, orjson.dumps({"i": i}) + b"\n") for i in range(500)))

    asyncio.run(main())
    assert log.commits < 500  # concurrent requests shared writes and fsyncs
    log.close()
    rows = read_all(tmp_path)
    assert sorted(r["i"] for r in rows[f"ds={DS}"]) == list(range(500))


def test_days_go_to_their_partition_and_files_rotate(tmp_path):
    log = JsonlLog(tmp_path, "impressions", max_bytes=200)
    for i in range(30):
        log.append_sync(DS if i < 20 else "2026-03-02", orjson.dumps({"i": i, "pad": "x" * 20}) + b"\n")
    log.close()
    rows = read_all(tmp_path)
    assert [r["i"] for r in rows[f"ds={DS}"]] == list(range(20))
    assert [r["i"] for r in rows["ds=2026-03-02"]] == list(range(20, 30))
    assert len(list((tmp_path / f"ds={DS}").glob("impressions-*.jsonl"))) > 1
    with pytest.raises(RuntimeError, match="closed"):
        log.append_sync(DS, b'{"i":0}\n')


def test_write_failure_is_not_acknowledged(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    log = JsonlLog(blocker, "impressions")
    with pytest.raises(OSError):
        log.append_sync(DS, b'{"i":0}\n')

    async def main() -> None:
        await log.append(DS, b'{"i":0}\n')

    with pytest.raises(OSError):
        asyncio.run(main())
    assert "not a directory" in (log.health() or "").lower()
    log.close()


def test_every_line_carries_a_checksum_of_its_row():
    payload = orjson.dumps({"event_id": "e1", "propensity": 0.25, "name": "Amélie"})
    line = frame(payload)
    assert line.startswith(b'{"_crc32":"%08x",' % zlib.crc32(payload))
    assert orjson.loads(line) == {"_crc32": f"{zlib.crc32(payload):08x}", **orjson.loads(payload)}
    assert unframe(line) == payload and unframe(line + b"\n") == payload
    flipped = line.replace(b"0.25", b"0.75")
    assert unframe(flipped) is None  # a changed value no longer matches
    for torn in (line[:-1], line[:30], line[:15]):
        assert unframe(torn) is None
    assert unframe(b'{"event_id":"e1"}') == b'{"event_id":"e1"}'  # older lines without a checksum pass as they are
    with pytest.raises(ValueError):
        frame(b"{}")
    with pytest.raises(ValueError):
        frame(b'{"a":1}\n{"b":2}')


class FailingDisk:
    """os.write for the log's files: one short write, then ENOSPC (a disk that fills mid-write)."""

    def __init__(self, log: JsonlLog, monkeypatch):
        self.log = log
        self.armed = 0
        self.short = False
        self.real = os.write
        monkeypatch.setattr(os, "write", self.write)

    def write(self, fd, data):
        if self.armed and fd in {f[0] for f in self.log._files.values()}:
            if not self.short:
                self.short = True
                return self.real(fd, bytes(data[: max(1, len(data) // 3)]))
            self.armed -= 1
            self.short = False
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.real(fd, data)


def test_disk_full_mid_write_leaves_whole_lines_and_the_next_append_is_not_glued(tmp_path, monkeypatch):
    log = JsonlLog(tmp_path, "impressions")
    disk = FailingDisk(log, monkeypatch)
    log.append_sync(DS, row(1) + row(2))
    disk.armed = 1
    with pytest.raises(OSError, match="No space"):
        log.append_sync(DS, row(3) + row(4))  # not acknowledged
    (path,) = log.paths()
    assert path.read_bytes().endswith(b"\n")  # cut back to the last whole line at once
    assert "No space" in log.health()
    log.append_sync(DS, row(5))
    assert log.health() is None
    log.close()
    assert [r["i"] for r in read_all(tmp_path)[f"ds={DS}"]] == [1, 2, 5]


def test_a_file_that_cannot_be_cut_back_is_abandoned(tmp_path, monkeypatch):
    log = JsonlLog(tmp_path, "impressions")
    disk = FailingDisk(log, monkeypatch)
    log.append_sync(DS, row(1))
    (old,) = log.paths()

    def no_truncate(fd, size):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "ftruncate", no_truncate)
    disk.armed = 1
    with pytest.raises(OSError):
        log.append_sync(DS, row(2) + row(3))
    assert not log.paths()  # abandoned: the next batch opens a new file
    log.append_sync(DS, row(4))
    log.close()
    files = sorted((tmp_path / f"ds={DS}").glob("*.jsonl"))
    assert len(files) == 2 and files[0] == old
    assert list(read_lines(files[1])) == [unframe(frame(row(4).strip()))]  # a whole line of its own
    first = list(read_lines(files[0]))
    assert orjson.loads(first[0])["i"] == 1 and first[-1] is None  # the fragment fails its checksum


def test_fsync_failure_is_not_acknowledged_and_the_batch_is_cut_back(tmp_path, monkeypatch):
    log = JsonlLog(tmp_path, "impressions")
    log.append_sync(DS, row(1))
    real = os.fdatasync
    calls = {"n": 0}

    def failing_once(fd):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd)

    monkeypatch.setattr(os, "fdatasync", failing_once)
    with pytest.raises(OSError, match="Input/output"):
        log.append_sync(DS, row(2))
    log.append_sync(DS, row(3))
    log.close()
    assert [r["i"] for r in read_all(tmp_path)[f"ds={DS}"]] == [1, 3]


def test_torn_tail_of_a_reused_file_is_cut_before_the_first_append(tmp_path):
    log = JsonlLog(tmp_path, "impressions")
    log._tag = "host-1-20260301T000000"  # a restart that reuses the name (same pid, same second)
    folder = tmp_path / f"ds={DS}"
    folder.mkdir()
    path = folder / "impressions-host-1-20260301T000000-0001.jsonl"
    path.write_bytes(frame(row(1).strip()) + b"\n" + frame(row(2).strip())[:25])  # crashed mid-write
    log.append_sync(DS, row(3))
    log.close()
    assert list(log.paths()) == [] and path.exists()
    assert [orjson.loads(p)["i"] for p in read_lines(path)] == [1, 3]


def test_health_reports_a_full_file_system(tmp_path):
    log = JsonlLog(tmp_path / "logs", "impressions", min_free_bytes=1 << 62)
    assert "full" in log.health()
    log.min_free_bytes = 0
    log.probe_interval_s = 0
    assert log.health() is None
    assert not list((tmp_path / "logs").glob(".probe-*"))  # the probe file is removed
    log.close()
    assert "closed" in log.health()
