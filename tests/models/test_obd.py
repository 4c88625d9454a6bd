"""The Open Bandit Dataset loader on a tiny hand-made CSV in OBD's format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from keyart.cli import main
from keyart.contracts import REWARDS, validate_records
from keyart.models.obd import (
    infer_campaign_policy,
    load_open_bandit_csv,
    open_bandit_pages,
    resolve_campaign_policy,
)
from keyart.ope import IPS, SNIPS

HEADER = ",timestamp,item_id,position,click,propensity_score,user_feature_0,user_feature_1," \
         "user_feature_2,user_feature_3,user-item_affinity_0,user-item_affinity_1"
ROWS = [
    "0,2019-11-24 00:00:17.158004+00:00,3,1,0,0.0125,81ce123cbb5bd8ce818f60fb3586bba5,03a5648a76832f83c859d46bc06cb64a,7bc94a2da491829b777c49c4b5e480f2,c39b0c7dd5d4eb9a18e7db6ba2f258f8,0.0,0.0",
    "1,2019-11-24 00:00:17.158004+00:00,70,2,1,0.0125,81ce123cbb5bd8ce818f60fb3586bba5,03a5648a76832f83c859d46bc06cb64a,7bc94a2da491829b777c49c4b5e480f2,c39b0c7dd5d4eb9a18e7db6ba2f258f8,0.0,1.0",
    "2,2019-11-24 00:00:17.158004+00:00,12,3,0,0.0125,81ce123cbb5bd8ce818f60fb3586bba5,03a5648a76832f83c859d46bc06cb64a,7bc94a2da491829b777c49c4b5e480f2,c39b0c7dd5d4eb9a18e7db6ba2f258f8,0.0,0.0",
    "3,2019-11-24 15:30:02.000000+00:00,0,1,1,0.0125,cef3390ed299c09874189c387777674a,2d03db5543b14483e52d761760686b64,719dc4cb2e0d3f0d4d3e1fd4d0b5b5e2,e2ad2a4bba5a5c6f8c6a3e8fa6dd0f0c,0.0,0.0",
]


@pytest.fixture
def obd_csv(tmp_path):
    path = tmp_path / "all.csv"
    path.write_text("\n".join([HEADER, *ROWS]) + "\n")
    return path


def test_rows_map_onto_the_rewards_contract(obd_csv):
    imp = load_open_bandit_csv(obd_csv, campaign="all", behavior_policy="random")
    assert len(imp) == 4
    first = imp.iloc[0]
    assert first["event_id"] == "obd-all-random-0"
    assert first["title_id"] == "obd-all-pos0" and imp.iloc[2]["title_id"] == "obd-all-pos2"
    assert first["artwork_id"] == "obd-all-item3"
    assert len(first["candidates"]) == 80
    assert first["context"]["local_hour"] == 9  # 00:00 UTC is 09:00 in Japan
    assert imp["member_id"].nunique() == 2  # identical user features -> one member
    assert imp["reward"].tolist() == [0, 1, 0, 1]
    for row in imp[REWARDS.columns].to_dict("records"):
        row["ts"] = row["ts"].to_pydatetime()
        assert REWARDS.validate_row(row) is None, REWARDS.validate_row(row)


def test_uniform_obd_log_values_uniform_random_as_its_click_rate(obd_csv):
    imp = load_open_bandit_csv(obd_csv)
    pages, rows = open_bandit_pages(imp)
    assert pages.n_rows == 4 * 80
    assert rows["is_logged"].sum() == 4
    uniform = np.full(pages.n_rows, 1 / 80)
    assert IPS().estimate(pages, uniform) == pytest.approx(0.5)
    assert SNIPS().estimate(pages, uniform) == pytest.approx(0.5)


@pytest.mark.parametrize(("kwargs", "text", "match"), [
    ({"campaign": "kids"}, None, "campaign must be one of"),
    ({"behavior_policy": "ucb"}, None, "behavior_policy must be one of"),
    ({"campaign": "men"}, None, r"item_id outside 0..33"),
    ({}, ",timestamp,item_id\n0,2019-11-24,1\n", "lacks columns"),
    ({}, HEADER + "\n" + ROWS[0].replace(",0.0125,", ",0.0,"), "propensity_score must be in"),
    ({}, HEADER + "\n" + ROWS[0].replace(",1,0,0.0125,", ",1,2,0.0125,"), "click must be 0 or 1"),
])
def test_bad_files_and_arguments_are_refused(obd_csv, tmp_path, kwargs, text, match):
    path = obd_csv
    if text is not None:
        path = tmp_path / "bad.csv"
        path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_open_bandit_csv(path, **kwargs)


def test_positions_1_to_3_are_slots_0_to_2_even_without_position_1(tmp_path):
    """The slot is the position minus one, never re-based on the file's smallest position."""
    path = tmp_path / "all.csv"
    path.write_text("\n".join([HEADER, ROWS[1], ROWS[2]]) + "\n")  # positions 2 and 3 only
    imp = load_open_bandit_csv(path)
    assert imp["title_id"].tolist() == ["obd-all-pos1", "obd-all-pos2"]
    assert [c["position"] for c in imp["context"]] == [1, 2]


@pytest.mark.parametrize("position", ["0", "4", "1.5", "two", ""])
def test_positions_outside_1_to_3_are_refused(tmp_path, position):
    path = tmp_path / "all.csv"
    bad = ROWS[3].split(",")
    bad[3] = position
    path.write_text("\n".join([HEADER, ROWS[0], ",".join(bad)]) + "\n")
    with pytest.raises(ValueError, match=r"position must be one of \(1, 2, 3\) \(OBD's three slots\), "
                                         r"got .* at index 3 \(1 such rows\)"):
        load_open_bandit_csv(path)


def test_campaign_and_policy_come_from_obds_layout(tmp_path):
    assert infer_campaign_policy("open_bandit_dataset/bts/men/men.csv") == ("men", "bts")
    assert infer_campaign_policy("x/random/women.csv") == ("women", "random")
    assert infer_campaign_policy("sample.csv") == (None, None)
    assert resolve_campaign_policy(Path("x/bts/all.csv"), None, "random") == ("all", "random")
    assert resolve_campaign_policy(Path("women.csv"), None, None) == ("women", "random")
    with pytest.raises(ValueError, match=r"pass --campaign all \| men \| women"):
        resolve_campaign_policy(Path("sample.csv"), None, None)


def test_keyart_obd_writes_the_rewards_contract_under_a_lake(obd_csv, tmp_path, capsys):
    out = tmp_path / "lake"
    assert main(["obd", "--csv", str(obd_csv), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "4 impressions (campaign all, 80 items, behaviour policy random), 2 members" in text
    files = sorted((out / "rewards").rglob("*.parquet"))
    assert [f.relative_to(out).as_posix() for f in files] == ["rewards/ds=2019-11-24/obd-all-random.parquet"]
    table = pq.read_table(files[0])
    assert table.schema.names[:len(REWARDS.columns)] == REWARDS.columns
    assert "user_feature_0" in table.schema.names
    report = validate_records(REWARDS, table.to_pylist(), source=str(files[0]))
    assert report.ok, report.summary()
    assert [r["title_id"] for r in table.to_pylist()] == ["obd-all-pos0", "obd-all-pos1", "obd-all-pos2", "obd-all-pos0"]


def test_keyart_obd_refuses_with_a_message(tmp_path, capsys):
    path = tmp_path / "sample.csv"
    path.write_text("\n".join([HEADER, *ROWS]) + "\n")
    assert main(["obd", "--csv", str(path), "--out", str(tmp_path / "lake")]) == 2
    assert "cannot tell the campaign from the file name" in capsys.readouterr().err
    assert main(["obd", "--csv", str(path), "--out", str(tmp_path / "lake"), "--campaign", "men"]) == 2
    assert "item_id outside 0..33 (campaign 'men' has 34 items)" in capsys.readouterr().err
    assert not (tmp_path / "lake").exists()


def test_random_logging_distribution_is_recorded_bts_is_not(obd_csv):
    random = load_open_bandit_csv(obd_csv, behavior_policy="random")
    assert random.iloc[0]["candidate_probabilities"] == [1 / 80] * 80
    bts = load_open_bandit_csv(obd_csv, behavior_policy="bts")
    assert bts["candidate_probabilities"].isna().all()
