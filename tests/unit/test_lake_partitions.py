"""lake.previous_priors_day: the newest earlier priors partition within the gap limit."""

from __future__ import annotations

from keyart.lake import Lake, partition_days, previous_priors_day


def _part(lake: Lake, ds: str, parquet: bool = True) -> None:
    folder = lake.priors(ds)
    folder.mkdir(parents=True)
    if parquet:
        (folder / "part-0.parquet").write_bytes(b"")


def test_newest_earlier_partition_with_parquet_within_the_limit(tmp_path):
    lake = Lake(tmp_path)
    assert previous_priors_day(lake, "2026-03-10", 90) is None  # no priors at all
    _part(lake, "2026-03-01")
    _part(lake, "2026-03-05")
    _part(lake, "2026-03-08", parquet=False)  # an empty folder is not a partition
    _part(lake, "2026-03-10")  # D itself (a rerun) is never its own warm start
    _part(lake, "2026-03-12")
    (lake.priors() / "ds=not-a-date").mkdir()
    assert partition_days(lake.priors(), "2026-03-10") == ["2026-03-01", "2026-03-05", "2026-03-10"]
    assert previous_priors_day(lake, "2026-03-10", 90) == "2026-03-05"
    assert previous_priors_day(lake, "2026-03-10", 5) == "2026-03-05"
    assert previous_priors_day(lake, "2026-03-10", 4) is None
    assert previous_priors_day(lake, "2026-03-06", 1) == "2026-03-05"
