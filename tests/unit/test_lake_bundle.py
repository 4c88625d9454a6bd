import json

import pytest

from keyart import bundle, feature_spec
from keyart.lake import Lake, parse_ds, shift_ds


def test_lake_paths_are_partitioned_by_ds(tmp_path):
    lake = Lake(tmp_path)
    assert lake.raw("plays", "2026-11-01") == tmp_path / "raw" / "plays" / "ds=2026-11-01"
    assert lake.clean("impressions", "2026-11-02").name == "ds=2026-11-02"
    assert lake.bundle_dir("2026-11-03") == tmp_path / "runs" / "ds=2026-11-03" / "bundle"
    assert shift_ds("2026-11-01", -1) == "2026-10-31"
    with pytest.raises(ValueError, match="impressions"):
        lake.raw("clicks", "2026-11-01")
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        parse_ds("11/01/2026")


def _bundle(tmp_path):
    d = tmp_path / "b"
    d.mkdir()
    for name in bundle.FILES:
        (d / name).write_bytes(b"x" + name.encode())
    (d / "feature_spec.json").write_text(json.dumps(feature_spec.spec_dict()))
    bundle.write_manifest(d, bundle_version="v1")
    return d


def test_bundle_round_trip(tmp_path):
    d = _bundle(tmp_path)
    m = bundle.verify(d)
    assert m.version == "v1"
    assert m.feature_spec_version == feature_spec.FEATURE_SPEC_VERSION


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda d: (d / "model.onnx").write_bytes(b"tampered"), "checksum"),
        (lambda d: (d / "priors.parquet").unlink(), "missing priors.parquet"),
        (lambda d: (d / "manifest.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "manifest.json").unlink(), "no manifest.json"),
    ],
)
def test_corrupt_bundle_is_refused(tmp_path, damage, match):
    d = _bundle(tmp_path)
    damage(d)
    with pytest.raises(bundle.BundleError, match=match):
        bundle.verify(d)


def test_bundle_for_another_feature_spec_is_refused(tmp_path):
    d = _bundle(tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    m["feature_spec_version"] = "999"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(bundle.BundleError, match="feature spec 999"):
        bundle.verify(d)
