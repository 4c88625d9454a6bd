"""``keyart ope`` through the real command line, against direct numpy computations.

Logs: a hand-built keyart log (JSON lines with serving's checksums + Parquet, non-uniform
logging, 2-5 candidates) and ``tests/models/data/obd/bts/men/men.csv``, synthetic rows in
the Open Bandit Dataset's format (its bts/men layout: 34 items, varying propensities).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from keyart.cli import main
from keyart.serving.event_log import frame

OBD_CSV = Path(__file__).parent / "data" / "obd" / "bts" / "men" / "men.csv"
EXACT = 1e-12


def ope(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["ope", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def ope_json(capsys, *argv: str) -> dict:
    rc, out, err = ope(capsys, *argv, "--json")
    assert rc == 0, err
    return json.loads(out)


def estimate(doc: dict, estimator: str, policy: str = "target") -> float:
    return doc["policies"][policy][estimator]["estimate"]


# --- a hand-built keyart log -----------------------------------------------------------------

def build_log(n: int = 400, seed: int = 3) -> dict:
    """Impressions with non-uniform logging, their target and q-hat, as plain arrays."""
    rng = np.random.default_rng(seed)
    k = rng.integers(2, 6, size=n)
    rows, target, q = [], [], []
    for i in range(n):
        title = f"t{i % 7}"
        cands = [f"{title}-art{j}" for j in range(k[i])]
        mu = rng.dirichlet(np.ones(k[i]))
        shown = int(rng.choice(k[i], p=mu))
        pi = rng.dirichlet(np.full(k[i], 0.7))
        pi[rng.random(k[i]) < 0.2] = 0.0  # some candidates the target never shows
        if pi.sum() == 0:
            pi[0] = 1.0
        pi = pi / pi.sum()
        target.append(pi)
        q.append(rng.random(k[i]) * 0.4)
        rows.append({
            "event_id": f"ev{i:04d}", "ts": "2026-03-01T20:15:00Z", "member_id": f"m{rng.integers(0, 40):03d}",
            "title_id": title, "artwork_id": cands[shown], "candidates": cands, "propensity": float(mu[shown]),
            "model_version": "v1", "policy": "squarecb",
            "context": {"device": "tv", "country": "US", "local_hour": 20, "day_of_week": 3, "page_row": 0,
                        "position": int(i % 4)},
            "impression_ds": "2026-03-01", "reward": int(rng.random() < 0.2 + 0.5 * (shown == 0)),
            "minutes": 0.0, "played": 0,
        })
    logged = np.array([r["candidates"].index(r["artwork_id"]) for r in rows])
    return {"rows": rows, "target": target, "q": q, "logged": logged,
            "reward": np.array([r["reward"] for r in rows], dtype=float),
            "propensity": np.array([r["propensity"] for r in rows])}


def write_jsonl(path: Path, rows: list[dict], checksum: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, separators=(",", ":")).encode() for r in rows]
    path.write_bytes(b"".join((frame(x) if checksum else x) + b"\n" for x in lines))
    return path


def write_log(root: Path, rows: list[dict]) -> Path:
    """First half as serving's checksummed JSON lines, second half as Parquet (files sort in log order)."""
    half = len(rows) // 2
    write_jsonl(root / "ds=2026-03-01" / "part-a.jsonl", rows[:half])
    (root / "ds=2026-03-02").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[half:]), root / "ds=2026-03-02" / "part-b.parquet")
    return root


def policy_table(log: dict, values: list[np.ndarray], column: str = "probability", drop_zeros: bool = True,
                 seed: int = 0) -> pd.DataFrame:
    recs = [{"event_id": r["event_id"], "artwork_id": a, column: float(v)}
            for r, vals in zip(log["rows"], values, strict=True)
            for a, v in zip(r["candidates"], vals, strict=True) if not (drop_zeros and v == 0)]
    return pd.DataFrame(recs).sample(frac=1.0, random_state=seed)  # order must not matter


@pytest.fixture
def keyart_log(tmp_path):
    log = build_log()
    log["path"] = write_log(tmp_path / "rewards", log["rows"])
    return log


def test_ips_snips_dr_equal_a_direct_computation_on_a_keyart_log(keyart_log, tmp_path, capsys):
    log = keyart_log
    probs = tmp_path / "target.csv"
    policy_table(log, log["target"]).to_csv(probs, index=False)
    qhat = tmp_path / "q.parquet"
    policy_table(log, log["q"], column="q_hat", drop_zeros=False).to_parquet(qhat)
    doc = ope_json(capsys, "--logs", log["path"], "--policy", probs, "--q-hat", qhat,
                   "--estimators", "ips,snips,dr", "--n-boot", 50)

    n = len(log["rows"])
    pi_logged = np.array([t[j] for t, j in zip(log["target"], log["logged"], strict=True)])
    w = pi_logged / log["propensity"]
    r = log["reward"]
    q_logged = np.array([q[j] for q, j in zip(log["q"], log["logged"], strict=True)])
    direct = np.array([t @ q for t, q in zip(log["target"], log["q"], strict=True)])
    assert doc["n_impressions"] == n and doc["logs"]["files"] == 2
    assert doc["policy"] == {"path": str(probs), "format": "table", "key": "event_id",
                             "rows": int(sum((t > 0).sum() for t in log["target"]))}
    assert estimate(doc, "ips") == pytest.approx(np.mean(w * r), abs=EXACT, rel=0)
    assert estimate(doc, "snips") == pytest.approx(np.sum(w * r) / np.sum(w), abs=EXACT, rel=0)
    assert estimate(doc, "dr") == pytest.approx(np.mean(direct + w * (r - q_logged)), abs=EXACT, rel=0)
    assert estimate(doc, "ips", "logging") == pytest.approx(r.mean(), abs=EXACT, rel=0)
    assert doc["diagnostics"]["weight_max"] == pytest.approx(w.max(), abs=EXACT, rel=0)
    assert doc["n_clusters"] == len({row["member_id"] for row in log["rows"]})
    for est in ("ips", "snips", "dr"):
        iv = doc["policies"]["target"][est]
        assert iv["lo"] <= iv["estimate"] <= iv["hi"]


def test_replay_ips_snips_on_uniform_logs_with_a_title_keyed_deterministic_target(tmp_path, capsys):
    """Uniform logging over 4 candidates, a target that always shows one artwork per title:
    replay is the mean reward where the logged artwork is that one, and so is SNIPS."""
    rng = np.random.default_rng(11)
    n, k = 600, 4
    choice = {f"t{t}": int(rng.integers(0, k)) for t in range(5)}
    rows = []
    for i in range(n):
        title = f"t{i % 5}"
        shown = int(rng.integers(0, k))
        rows.append({"event_id": f"u{i}", "member_id": f"m{i % 50}", "title_id": title,
                     "candidates": [f"{title}-a{j}" for j in range(k)], "artwork_id": f"{title}-a{shown}",
                     "propensity": 1 / k, "reward": int(rng.random() < (0.6 if shown == choice[title] else 0.2))})
    write_jsonl(tmp_path / "log.jsonl", rows, checksum=False)
    table = pd.DataFrame([{"title_id": t, "artwork_id": f"{t}-a{j}", "probability": float(j == c)}
                          for t, c in choice.items() for j in range(k)])
    table.to_parquet(tmp_path / "det.parquet")
    doc = ope_json(capsys, "--logs", tmp_path / "log.jsonl", "--policy", tmp_path / "det.parquet",
                   "--estimators", "replay,ips,snips", "--n-boot", 30, "--seed", 4)

    kept = np.array([r["artwork_id"] == f"{r['title_id']}-a{choice[r['title_id']]}" for r in rows])
    reward = np.array([r["reward"] for r in rows], dtype=float)
    assert doc["policy"]["key"] == "title_id"
    assert doc["diagnostics"]["replay_kept"] == kept.sum()
    assert estimate(doc, "replay") == pytest.approx(reward[kept].mean(), abs=EXACT, rel=0)
    assert estimate(doc, "ips") == pytest.approx(np.mean(k * kept * reward), abs=EXACT, rel=0)
    assert estimate(doc, "snips") == pytest.approx(reward[kept].mean(), abs=EXACT, rel=0)


def test_impression_log_with_a_separate_rewards_table(keyart_log, tmp_path, capsys):
    log = keyart_log
    impressions = [{k: v for k, v in r.items() if k not in ("reward", "minutes", "played", "impression_ds")}
                   for r in log["rows"]]
    write_jsonl(tmp_path / "raw" / "impressions-1.jsonl", impressions)
    rewards = pd.DataFrame({"event_id": [r["event_id"] for r in log["rows"]] + ["not-logged"],
                            "reward": [r["reward"] for r in log["rows"]] + [1]})
    rewards.iloc[::-1].to_csv(tmp_path / "rewards.csv", index=False)
    policy_table(log, log["target"]).to_csv(tmp_path / "target.csv", index=False)
    doc = ope_json(capsys, "--logs", tmp_path / "raw", "--rewards", tmp_path / "rewards.csv",
                   "--policy", tmp_path / "target.csv", "--estimators", "ips", "--n-boot", 20)
    with_reward = ope_json(capsys, "--logs", log["path"], "--policy", tmp_path / "target.csv",
                           "--estimators", "ips", "--n-boot", 20)
    assert estimate(doc, "ips") == estimate(with_reward, "ips")
    assert doc["logs"]["rewards"]["rows_not_in_log"] == 1


def test_cluster_by_member_or_not_changes_the_interval_only(keyart_log, tmp_path, capsys):
    policy_table(keyart_log, keyart_log["target"]).to_csv(tmp_path / "target.csv", index=False)
    args = ("--logs", keyart_log["path"], "--policy", tmp_path / "target.csv", "--estimators", "ips")
    member = ope_json(capsys, *args)
    single = ope_json(capsys, *args, "--cluster", "none")
    assert member["cluster"] == "member" and single["cluster"] == "none"
    assert single["n_clusters"] == 400 and member["n_clusters"] < 400
    assert estimate(member, "ips") == estimate(single, "ips")
    assert member["policies"]["target"]["ips"] != single["policies"]["target"]["ips"]
    again = ope_json(capsys, *args)
    assert again["policies"] == member["policies"]  # seeded


def test_text_output(keyart_log, tmp_path, capsys):
    policy_table(keyart_log, keyart_log["target"]).to_csv(tmp_path / "target.csv", index=False)
    rc, out, err = ope(capsys, "--logs", keyart_log["path"], "--policy", tmp_path / "target.csv", "--n-boot", 20)
    assert rc == 0, err
    assert "400 impressions, 2-5 candidates each" in out
    assert "clustered by member" in out
    for label in ("target   replay", "target   ips", "target   snips", "logging  on-policy", "replay kept"):
        assert label in out


# --- the Open Bandit Dataset format ------------------------------------------------------------

def obd_raw(path: Path = OBD_CSV) -> pd.DataFrame:
    return pd.read_csv(path, index_col=0)


def direct_obd(raw: pd.DataFrame, action_dist: np.ndarray, shift: int = 1) -> tuple[float, float]:
    """IPW and SNIPW as the Open Bandit Pipeline defines them: slot = position - 1."""
    i = np.arange(len(raw))
    w = action_dist[i, raw["item_id"].to_numpy(), raw["position"].to_numpy() - shift] / raw["propensity_score"].to_numpy()
    r = raw["click"].to_numpy()
    return float(np.mean(w * r)), float(np.sum(w * r) / np.sum(w))


def action_dist(n: int, n_items: int = 34, seed: int = 0) -> np.ndarray:
    """A position-dependent policy: [n, n_items, 3], each [i, :, k] a distribution."""
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.full(n_items, 0.3), size=(n, 3)).transpose(0, 2, 1)


def test_obd_csv_with_an_action_dist_equals_obps_ipw(tmp_path, capsys):
    raw = obd_raw()
    ad = action_dist(len(raw))
    np.save(tmp_path / "action_dist.npy", ad)
    doc = ope_json(capsys, "--logs", OBD_CSV, "--policy", tmp_path / "action_dist.npy", "--n-boot", 30)
    ips, snips = direct_obd(raw, ad)
    assert doc["logs"] == {"path": str(OBD_CSV), "format": "obd", "campaign": "men", "behavior_policy": "bts",
                           "n_items": 34}
    assert doc["policy"]["shape"] == [len(raw), 34, 3]
    assert estimate(doc, "ips") == pytest.approx(ips, abs=EXACT, rel=0)
    assert estimate(doc, "snips") == pytest.approx(snips, abs=EXACT, rel=0)
    assert estimate(doc, "ips", "logging") == pytest.approx(raw["click"].mean(), abs=EXACT, rel=0)


def test_obd_file_without_position_1_is_not_shifted(tmp_path, capsys):
    raw = obd_raw()
    sub = raw[raw["position"] != 1]
    path = tmp_path / "men.csv"
    sub.to_csv(path)
    ad = action_dist(len(sub), seed=5)
    np.save(tmp_path / "ad.npy", ad)
    doc = ope_json(capsys, "--logs", path, "--policy", tmp_path / "ad.npy", "--estimators", "ips,snips",
                   "--n-boot", 20)
    right, shifted = direct_obd(sub, ad)[0], direct_obd(sub, ad, shift=2)[0]
    assert abs(right - shifted) > 1e-3  # the old re-basing on the file's minimum would show
    assert estimate(doc, "ips") == pytest.approx(right, abs=EXACT, rel=0)
    assert doc["logs"]["behavior_policy"] == "random"  # not in the path: the default


def test_obd_with_a_position_keyed_table(tmp_path, capsys):
    raw = obd_raw()
    rng = np.random.default_rng(8)
    per_slot = rng.dirichlet(np.ones(34), size=3)  # [slot, item]
    pd.DataFrame([{"position": s, "artwork_id": f"obd-men-item{a}", "probability": per_slot[s, a]}
                  for s in range(3) for a in range(34)]).to_csv(tmp_path / "slots.csv", index=False)
    doc = ope_json(capsys, "--logs", OBD_CSV, "--policy", tmp_path / "slots.csv", "--estimators", "ips,snips",
                   "--n-boot", 20)
    ad = np.broadcast_to(per_slot.T[None], (len(raw), 34, 3))
    ips, snips = direct_obd(raw, ad)
    assert doc["policy"]["key"] == "position"
    assert estimate(doc, "ips") == pytest.approx(ips, abs=EXACT, rel=0)
    assert estimate(doc, "snips") == pytest.approx(snips, abs=EXACT, rel=0)


def test_keyart_obd_then_ope_on_the_lake_equals_ope_on_the_csv(tmp_path, capsys):
    assert main(["obd", "--csv", str(OBD_CSV), "--out", str(tmp_path / "lake")]) == 0
    assert "slots (OBD position - 1)" in capsys.readouterr().out
    np.save(tmp_path / "ad.npy", action_dist(len(obd_raw()), seed=2))
    args = ("--policy", tmp_path / "ad.npy", "--estimators", "ips,snips", "--n-boot", 20)
    from_csv = ope_json(capsys, "--logs", OBD_CSV, *args)
    from_lake = ope_json(capsys, "--logs", tmp_path / "lake" / "rewards", *args)
    assert from_lake["logs"]["format"] == "keyart" and from_lake["logs"]["files"] == 3  # three days
    assert from_lake["policies"] == from_csv["policies"]


# --- refusals --------------------------------------------------------------------------------

SMALL = [
    {"event_id": "e1", "member_id": "m1", "title_id": "t1", "candidates": ["a1", "a2"], "artwork_id": "a1",
     "propensity": 0.5, "reward": 1, "context": {"position": 0}},
    {"event_id": "e2", "member_id": "m2", "title_id": "t2", "candidates": ["b1", "b2", "b3"], "artwork_id": "b3",
     "propensity": 0.2, "reward": 0, "context": {"position": 1}},
    {"event_id": "e3", "member_id": "m1", "title_id": "t1", "candidates": ["a1", "a2"], "artwork_id": "a2",
     "propensity": 0.5, "reward": 0, "context": {"position": 0}},
]
GOOD = "event_id,artwork_id,probability\ne1,a1,0.3\ne1,a2,0.7\ne2,b1,0.2\ne2,b2,0.3\ne2,b3,0.5\ne3,a1,1\n"


@pytest.mark.parametrize(("policy", "match"), [
    (GOOD.replace("e1,a2,0.7", "e1,a2,1.5"), r"p.csv line 3: probability must be a finite number in \[0, 1\], got 1.5 \(1 such rows\)"),
    (GOOD.replace("e1,a1,0.3", "e1,a1,-0.1").replace("0.7", "1.1"), "probability must be a finite number in"),
    (GOOD.replace("e1,a1,0.3", "e1,a1,abc"), r"probability must be a finite number .*'abc'"),
    (GOOD.replace("e2,b3,0.5", "e2,b3,0.4"), r"impression 'e2' \(round 1\) sum to 0.9 over its 3 candidates"),
    (GOOD.replace("e3,a1,1\n", ""), r"1 of 3 logged impressions have no rows, e.g. event_id 'e3'"),
    (GOOD + "e9,a1,1\ne8,a1,1\n", r"2 event_id values are not in the log .*'e8', 'e9'"),
    (GOOD.replace("e3,a1,1", "e3,a1,0.5\ne3,zz,0.5"), r"not a candidate of their event_id: artwork_id 'zz' for event_id 'e3'"),
    (GOOD + "e3,a1,0\n", r"event_id 'e3', artwork_id 'a1' has 2 rows"),
    ("artwork_id,probability\na1,1\n", "needs a key column"),
    ("title_id,artwork_id,probability\nt1,a1,1\nt2,b1,0.5\nt2,b2,0.5\nt9,a1,1\n", r"title_id values are not in the log .*'t9'"),
])
def test_bad_policy_tables_are_refused_with_the_reason(tmp_path, capsys, policy, match):
    write_jsonl(tmp_path / "log.jsonl", SMALL)
    (tmp_path / "p.csv").write_text(policy)
    rc, out, err = ope(capsys, "--logs", tmp_path / "log.jsonl", "--policy", tmp_path / "p.csv")
    assert rc == 2 and out == ""
    assert err.startswith("keyart ope: error: ")
    assert re.search(match, err), err


def test_the_small_log_and_good_table_pass(tmp_path, capsys):
    write_jsonl(tmp_path / "log.jsonl", SMALL)
    (tmp_path / "p.csv").write_text(GOOD)
    doc = ope_json(capsys, "--logs", tmp_path / "log.jsonl", "--policy", tmp_path / "p.csv", "--n-boot", 10)
    # weights 0.3/0.5, 0.5/0.2, 0/0.5; rewards 1, 0, 0
    assert estimate(doc, "ips") == pytest.approx(0.6 / 3, abs=EXACT, rel=0)
    assert estimate(doc, "snips") == pytest.approx(0.6 / (0.6 + 2.5), abs=EXACT, rel=0)
    assert doc["diagnostics"]["target_support_of_logged"] == 2


THREE = [dict(r, candidates=["x1", "x2", "x3"], artwork_id="x2") for r in SMALL]  # 3 candidates each


@pytest.mark.parametrize(("rows", "array", "match"), [
    (SMALL, np.full((2, 2, 1), 0.5), "has 2 rounds, the log .* has 3 impressions"),
    (SMALL, np.full((3, 2, 1), 0.5), "has 2 actions, but impression 'e2' has 3 candidates"),
    (THREE, np.full((3, 3), 0.5), r"action_dist\[0, :, 0\] sums to 1.5"),
    (THREE, np.full((3, 3, 1), np.nan), r"\[0, 0, 0\] = nan; values must be finite and in \[0, 1\]"),
    (THREE, np.full((3, 3, 2, 2), 0.5), r"expected shape \[n_rounds, n_actions, len_list\]"),
])
def test_bad_action_dist_arrays_are_refused(tmp_path, capsys, rows, array, match):
    write_jsonl(tmp_path / "log.jsonl", rows)
    np.save(tmp_path / "ad.npy", array)
    rc, _, err = ope(capsys, "--logs", tmp_path / "log.jsonl", "--policy", tmp_path / "ad.npy")
    assert rc == 2
    assert re.search(match, err), err


def test_action_dist_positions_must_fit_len_list(tmp_path, capsys):
    rows = [dict(r, candidates=["x1", "x2"], artwork_id="x1", context={"position": i}) for i, r in enumerate(SMALL)]
    write_jsonl(tmp_path / "log.jsonl", rows)
    np.save(tmp_path / "ad.npy", np.full((3, 2, 2), 0.5))
    rc, _, err = ope(capsys, "--logs", tmp_path / "log.jsonl", "--policy", tmp_path / "ad.npy")
    assert rc == 2 and "impression 'e3' is at position 2, outside the array's len_list 2" in err


def _edit(index: int, **changes):
    def apply(rows):
        rows = [dict(r) for r in rows]
        rows[index].update(changes)
        return [{k: v for k, v in r.items() if v is not ...} for r in rows]
    return apply


@pytest.mark.parametrize(("change", "match"), [
    (_edit(1, artwork_id="zz"), r"line 2: artwork_id 'zz' is not one of its candidates"),
    (_edit(2, event_id="e1"), r"event_id 'e1' appears 2 times"),
    (_edit(0, reward=...), r"line 1: no reward"),
    (_edit(0, reward="1"), r"line 1: reward must be a finite number, got '1'"),
    (_edit(0, propensity=0.0), r"line 1: propensity must be >= 1e-09"),
    (_edit(0, member_id=123), r"line 1: member_id must be a string, got int"),
    (_edit(0, member_id=...), r"line 1: member_id is missing; .*--cluster none"),
    (_edit(1, candidates=["b1", "b3", "b3"]), r"line 2: candidates list 'b3' twice"),
])
def test_bad_logs_are_refused_with_file_line_and_field(tmp_path, capsys, change, match):
    write_jsonl(tmp_path / "log.jsonl", change(SMALL))
    (tmp_path / "p.csv").write_text(GOOD)
    rc, _, err = ope(capsys, "--logs", tmp_path / "log.jsonl", "--policy", tmp_path / "p.csv")
    assert rc == 2
    assert re.search(match, err), err


def test_a_line_failing_its_checksum_is_refused(tmp_path, capsys):
    path = write_jsonl(tmp_path / "log.jsonl", SMALL)
    path.write_bytes(path.read_bytes().replace(b'"propensity":0.2', b'"propensity":0.3'))
    (tmp_path / "p.csv").write_text(GOOD)
    rc, _, err = ope(capsys, "--logs", path, "--policy", tmp_path / "p.csv")
    assert rc == 2 and "line 2: checksum mismatch" in err


def test_dr_needs_q_hat_and_q_hat_covers_every_candidate(tmp_path, capsys):
    write_jsonl(tmp_path / "log.jsonl", SMALL)
    (tmp_path / "p.csv").write_text(GOOD)
    args = ("--logs", tmp_path / "log.jsonl", "--policy", tmp_path / "p.csv")
    rc, _, err = ope(capsys, *args, "--estimators", "ips,dr")
    assert rc == 2 and "dr needs --q-hat" in err
    (tmp_path / "q.csv").write_text(GOOD.replace("probability", "q_hat").replace("e3,a1,1\n", "e3,a1,1\n"))
    rc, _, err = ope(capsys, *args, "--q-hat", tmp_path / "q.csv")
    assert rc == 2 and "no q_hat for artwork_id 'a2' of event_id 'e3'" in err
    (tmp_path / "q.csv").write_text(GOOD.replace("probability", "q_hat") + "e3,a2,0.25\n")
    doc = ope_json(capsys, *args, "--q-hat", tmp_path / "q.csv", "--n-boot", 10)
    assert doc["estimators"] == ["replay", "ips", "snips", "dr"]
    # e1: 0.3*0.3 + 0.7*0.7 + 0.6*(1 - 0.3); e2: 0.04+0.09+0.25 + 2.5*(0 - 0.5); e3: 1*1 + 0
    want = (0.58 + 0.42 + (0.38 - 1.25) + 1.0) / 3
    assert estimate(doc, "dr") == pytest.approx(want, abs=EXACT, rel=0)


def test_unknown_estimator_is_an_argument_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["ope", "--logs", str(tmp_path), "--policy", "p.csv", "--estimators", "ips,magic"])
    assert "choose from replay,ips,snips,dr" in capsys.readouterr().err


def test_missing_files_are_named(tmp_path, capsys):
    rc, _, err = ope(capsys, "--logs", tmp_path / "nope", "--policy", tmp_path / "p.csv")
    assert rc == 2 and "nope: no such file or folder" in err
    rc, _, err = ope(capsys, "--logs", OBD_CSV, "--policy", tmp_path / "p.csv")
    assert rc == 2 and "p.csv: no such file" in err


def test_unframe_reads_servings_line_format():
    from keyart.models.offline import unframe

    payload = json.dumps(SMALL[0], separators=(",", ":")).encode()
    line = frame(payload)
    assert unframe(line + b"\n") == payload
    assert unframe(payload) == payload  # a line without a checksum is taken as is
    assert unframe(line[:-3]) is None  # torn
    assert unframe(line.replace(b'"_crc32":"', b'"_crc32":"0', 1)[:len(line)]) is None
