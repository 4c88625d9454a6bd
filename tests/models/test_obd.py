"""The Open Bandit Dataset loader on a tiny hand-made CSV in OBD's format."""

from __future__ import annotations

import numpy as np
import pytest

from keyart.contracts import REWARDS
from keyart.models.obd import load_open_bandit_csv, open_bandit_pages
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
