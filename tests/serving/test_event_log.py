"""The group-committed JSON-lines log: durability policies, grouping, rotation, failures."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from keyart.serving.event_log import JsonlLog


def read_all(root: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for f in sorted(root.rglob("*.jsonl")):
        out.setdefault(f.parent.name, []).extend(orjson.loads(x) for x in f.read_bytes().splitlines())
    return out


@pytest.mark.parametrize("fsync", ["always", "interval"])
def test_concurrent_appends_are_grouped_and_all_durable(tmp_path, fsync):
    log = JsonlLog(tmp_path, "impressions", fsync=fsync, fsync_interval_ms=5)

    async def main() -> None:
        await asyncio.gather(*(log.append("2026-03-01", orjson.dumps({"i": i}) + b"\n") for i in range(500)))

    asyncio.run(main())
    assert log.commits < 500  # concurrent requests shared writes and fsyncs
    log.close()
    rows = read_all(tmp_path)
    assert sorted(r["i"] for r in rows["ds=2026-03-01"]) == list(range(500))


def test_days_go_to_their_partition_and_files_rotate(tmp_path):
    log = JsonlLog(tmp_path, "impressions", max_bytes=200)
    for i in range(30):
        log.append_sync("2026-03-01" if i < 20 else "2026-03-02", orjson.dumps({"i": i, "pad": "x" * 20}) + b"\n")
    log.close()
    rows = read_all(tmp_path)
    assert [r["i"] for r in rows["ds=2026-03-01"]] == list(range(20))
    assert [r["i"] for r in rows["ds=2026-03-02"]] == list(range(20, 30))
    assert len(list((tmp_path / "ds=2026-03-01").glob("impressions-*.jsonl"))) > 1
    with pytest.raises(RuntimeError, match="closed"):
        log.append_sync("2026-03-01", b"{}\n")


def test_write_failure_is_not_acknowledged(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    log = JsonlLog(blocker, "impressions")
    with pytest.raises(OSError):
        log.append_sync("2026-03-01", b"{}\n")

    async def main() -> None:
        await log.append("2026-03-01", b"{}\n")

    with pytest.raises(OSError):
        asyncio.run(main())
    log.close()
