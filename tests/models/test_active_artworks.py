import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from keyart.contracts import ARTWORKS, TITLES
from keyart.lake import Lake
from keyart.models.export import active_artworks


def _lake(tmp_path, active_to):
    lake = Lake(tmp_path)
    lake.titles.mkdir(parents=True)
    lake.artworks.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"title_id": "t", "name": "T", "genres": ["drama"], "cast": [],
                                          "maturity_rating": "PG"}], TITLES.arrow_schema()), lake.titles / "p.parquet")
    rows = [
        {"artwork_id": "old", "title_id": "t", "tags": [], "is_default": True,
         "active_from": dt.date(2026, 10, 1), "active_to": active_to[0]},
        {"artwork_id": "later", "title_id": "t", "tags": [], "is_default": False,
         "active_from": dt.date(2026, 11, 5), "active_to": active_to[1]},
        {"artwork_id": "tomorrow", "title_id": "t", "tags": [], "is_default": False,
         "active_from": dt.date(2026, 11, 2), "active_to": active_to[2]},
        {"artwork_id": "far", "title_id": "t", "tags": [], "is_default": False,  # past the export horizon
         "active_from": dt.date(2026, 11, 20), "active_to": None},
    ]
    pq.write_table(pa.Table.from_pylist(rows, ARTWORKS.arrow_schema()), lake.artworks / "p.parquet")
    return lake


@pytest.mark.parametrize(
    "active_to, expected",
    [
        # "later" starts within the export horizon: a bundle that stays champion must know it
        ((None, None, None), ["old", "later", "tomorrow"]),  # open-ended: active_to all null
        ((dt.date(2026, 10, 31), None, None), ["later", "tomorrow"]),  # retired before ds
        ((dt.date(2026, 11, 1), None, dt.date(2026, 11, 2)), ["old", "later", "tomorrow"]),  # last day is ds
    ],
)
def test_active_artworks_from_ds_through_the_export_horizon(tmp_path, active_to, expected):
    out = active_artworks(_lake(tmp_path, active_to), "2026-11-01")
    assert sorted(out["artwork_id"]) == sorted(expected)
    assert all(list(g) == ["drama"] for g in out["title_genres"])
