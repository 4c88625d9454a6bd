import json

import pytest

from keyart import bundle, feature_spec, registry
from keyart.config import Settings
from keyart.lake import Lake, parse_ds, shift_ds
from keyart.scoring import OnnxScorer


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


def test_model_uris_parse_to_name_alias_version():
    assert registry.parse_model_uri("models:/keyart-artwork@champion") == ("keyart-artwork", "champion", None)
    assert registry.parse_model_uri("models:/keyart-artwork/7") == ("keyart-artwork", None, "7")
    assert registry.parse_model_uri("models:/keyart-artwork") == ("keyart-artwork", registry.CHAMPION, None)
    assert registry.champion_uri(Settings()) == f"models:/{Settings().registered_model}@{registry.CHAMPION}"


def test_a_bundle_folder_resolves_to_itself_and_its_version(tmp_path):
    d = _bundle(tmp_path)
    found = registry.resolve(str(d), Settings())
    assert found == registry.Resolved(f"{d.resolve()}:v1", path=d.resolve())
    assert registry.resolve(f"file://{d}", Settings()) == found
    assert registry.fetch(found) == d.resolve()
    assert registry.resolve(str(tmp_path / "nothing-here"), Settings()) is None


def test_no_registry_yet_resolves_to_nothing_without_creating_one(_isolated_home):
    s = Settings()
    db = s.home / "mlflow" / "mlflow.db"
    assert s.tracking_uri == f"sqlite:///{db}"
    for uri in (registry.champion_uri(s), "models:/keyart-artwork/3"):
        assert registry.resolve(uri, s) is None
    assert registry.champion_bundle_path(s) is None and registry.get_champion_version(s) is None
    assert not db.exists()  # a lookup creates no registry


def test_a_model_with_other_io_names_is_refused(tmp_path):
    from onnx import TensorProto, helper

    def identity_model(input_name: str) -> bytes:
        node = helper.make_node("Identity", [input_name], [bundle.OUTPUT_NAME])
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [None, 2])],
                                  [helper.make_tensor_value_info(bundle.OUTPUT_NAME, TensorProto.FLOAT, [None, 2])])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]).SerializeToString()

    with pytest.raises(bundle.BundleError, match="need input 'features'"):
        OnnxScorer(identity_model("x"))
    with pytest.raises(bundle.BundleError, match=r"need \[N, \d+\]"):
        OnnxScorer(identity_model(bundle.INPUT_NAME))  # 2 features, not the spec's
