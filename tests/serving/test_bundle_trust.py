"""Signed bundles and the store's handling of failures (issue 22, points 6 and 10): the
manifest signature (Ed25519) is checked before anything else of a bundle is trusted; a
failure that may pass is retried with backoff and never blacklists the new champion; every
refusal is an event with its reason (logged and counted by the app)."""

from __future__ import annotations

import json
import os
import stat
import time

import pytest
from fastapi.testclient import TestClient
from serving_fixtures import make_bundle
from test_registry import new_registry, register

from keyart import bundle as kb
from keyart import registry
from keyart.config import Settings
from keyart.serving.app import create_app
from keyart.serving.bundle_store import BundleStore

SECRET = "bundle-trust-tests-event-secret-" + "0" * 40


def recording_store(s: Settings, uri: str | None = None) -> tuple[BundleStore, list[tuple[str, dict]]]:
    events: list[tuple[str, dict]] = []
    return BundleStore(s, uri, on_event=lambda e, f: events.append((e, f))), events


def names(events: list[tuple[str, dict]]) -> list[str]:
    return [e for e, _ in events]


# --- signatures --------------------------------------------------------------------------

def test_the_manifest_is_signed_with_a_generated_key_and_verifies(tmp_path, _isolated_home, lgbm_model):
    make_bundle(tmp_path / "b", lgbm_model, "v1")
    priv, pub = kb.signing_key_path(), kb.public_key_path()
    assert priv == _isolated_home / "keys" / "bundle-signing.pem" and pub == priv.with_suffix(".pub")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600 and b"PRIVATE KEY" in priv.read_bytes()
    assert b"PRIVATE" not in pub.read_bytes()  # serving needs only this half
    trusted = kb.load_public_keys(pub)
    kid = kb.verify_signature(tmp_path / "b", trusted)
    assert list(trusted) == [kid] and json.loads((tmp_path / "b" / kb.SIGNATURE_FILE).read_text())["key_id"] == kid

    manifest = (tmp_path / "b" / kb.MANIFEST).read_bytes()
    (tmp_path / "b" / kb.MANIFEST).write_bytes(manifest.replace(b'"v1"', b'"v9"'))  # one changed value
    with pytest.raises(kb.BundleError, match="does not verify") as exc:
        kb.verify_signature(tmp_path / "b", trusted)
    assert exc.value.reason == "bad_signature"
    (tmp_path / "b" / kb.MANIFEST).write_bytes(manifest)
    sig = json.loads((tmp_path / "b" / kb.SIGNATURE_FILE).read_text())
    sig["signature"] = sig["signature"][:-4] + ("AAA=" if not sig["signature"].endswith("AAA=") else "BBB=")
    (tmp_path / "b" / kb.SIGNATURE_FILE).write_text(json.dumps(sig))
    with pytest.raises(kb.BundleError, match="does not verify"):
        kb.verify_signature(tmp_path / "b", trusted)
    (tmp_path / "b" / kb.SIGNATURE_FILE).write_text("not json")
    with pytest.raises(kb.BundleError, match="unreadable signature"):
        kb.verify_signature(tmp_path / "b", trusted)
    (tmp_path / "b" / kb.SIGNATURE_FILE).unlink()
    with pytest.raises(kb.BundleError, match="unsigned") as exc:
        kb.verify_signature(tmp_path / "b", trusted)
    assert exc.value.reason == "unsigned"


def test_key_rotation_trusts_every_key_in_the_public_key_file(tmp_path, _isolated_home, lgbm_model):
    old = kb.generate_key(tmp_path / "old.pem")
    make_bundle(tmp_path / "b", lgbm_model, "v1")  # signed with the home's key
    make_bundle(tmp_path / "c", lgbm_model, "v2")
    kb.sign(tmp_path / "c", key=old)
    both = tmp_path / "trusted.pub"
    both.write_bytes(kb.public_key_path().read_bytes() + (tmp_path / "old.pub").read_bytes())
    trusted = kb.load_public_keys(both)
    assert len(trusted) == 2
    assert kb.verify_signature(tmp_path / "b", trusted) != kb.verify_signature(tmp_path / "c", trusted)
    with pytest.raises(kb.BundleError, match="not trusted") as exc:
        kb.verify_signature(tmp_path / "c", kb.load_public_keys(kb.public_key_path()))
    assert exc.value.reason == "unknown_key"
    (tmp_path / "junk.pub").write_text("-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n")
    with pytest.raises(kb.BundleError, match="not a PEM public key"):
        kb.load_public_keys(tmp_path / "junk.pub")
    (tmp_path / "empty.pub").write_text("")
    with pytest.raises(kb.BundleError, match="holds no PEM public key"):
        kb.load_public_keys(tmp_path / "empty.pub")


def test_a_configured_signing_key_must_exist(tmp_path):
    s = Settings(bundle_signing_key=tmp_path / "missing.pem")
    with pytest.raises(kb.BundleError, match="does not exist.*openssl genpkey"):
        kb.signing_key(s)
    assert not (tmp_path / "missing.pem").exists()  # never generated behind an explicit setting


def test_serving_without_a_trusted_key_refuses_outside_dev_mode_and_a_key_installed_later_lifts_it(
        tmp_path, _isolated_home, lgbm_model):
    foreign = kb.generate_key(tmp_path / "daily-run" / "key.pem")
    make_bundle(tmp_path / "b", lgbm_model, "v1")
    kb.sign(tmp_path / "b", key=foreign)  # signed by a key whose public half serving does not have yet
    kb.public_key_path().unlink()
    kb.signing_key_path().unlink()

    store, events = recording_store(Settings(), str(tmp_path / "b"))
    assert store.poll_once() is False and store.current is None
    (event, fields), = [x for x in events if x[0] == "bundle_refused"]
    assert fields["reason"] == "no_trusted_key" and "serve_bundle_public_key" in fields["error"]
    assert store.poll_once() is False and names(events).count("bundle_refused") == 1  # not retried...

    kb.public_key_path().parent.mkdir(parents=True, exist_ok=True)
    kb.public_key_path().write_bytes((tmp_path / "daily-run" / "key.pub").read_bytes())
    assert store.poll_once() is True  # ...until the trusted key file changes
    assert store.current.signed_by == kb.key_id(foreign.public_key())


def test_dev_mode_accepts_an_unsigned_bundle_but_never_a_bad_signature(tmp_path, _isolated_home, lgbm_model):
    make_bundle(tmp_path / "b", lgbm_model, "v1")
    (tmp_path / "b" / kb.SIGNATURE_FILE).unlink()
    strict, strict_events = recording_store(Settings(), str(tmp_path / "b"))
    assert strict.poll_once() is False
    assert [f["reason"] for e, f in strict_events if e == "bundle_refused"] == ["unsigned"]

    dev, events = recording_store(Settings(serve_dev_mode=True), str(tmp_path / "b"))
    assert dev.poll_once() is True and dev.current.signed_by is None
    assert names(events)[-2:] == ["bundle_swapped", "bundle_signature_unchecked"]

    make_bundle(tmp_path / "c", lgbm_model, "v2")
    (tmp_path / "c" / kb.MANIFEST).write_text((tmp_path / "c" / kb.MANIFEST).read_text() + " ")
    dev2, events2 = recording_store(Settings(serve_dev_mode=True), str(tmp_path / "c"))
    assert dev2.poll_once() is False
    assert [f["reason"] for e, f in events2 if e == "bundle_refused"] == ["bad_signature"]


# --- refusals of a folder URI: reported once per distinct problem ------------------------

def test_missing_folder_and_non_json_manifest_are_reported_and_counted(tmp_path, bundle_dir):
    path, world = bundle_dir
    link = tmp_path / "current"
    os.symlink(tmp_path / "not-there", link)
    app = create_app(Settings(serve_event_secret=SECRET), model_uri=str(link), poll=False)
    with TestClient(app) as c:
        store = c.app.state.runtime.store
        for _ in range(3):
            store.poll_once()
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / kb.MANIFEST).write_text("{not json")
        os.symlink(broken, tmp_path / "next")
        os.replace(tmp_path / "next", link)
        store.poll_once()
        store.poll_once()
        os.symlink(path, tmp_path / "next")
        os.replace(tmp_path / "next", link)
        assert store.poll_once() is True
        ready = c.get("/readyz").json()
        metrics = c.get("/metrics").text
    assert ready["model_version"] == "v1" and ready["ready"]
    assert 'keyart_bundle_refusals_total{reason="missing_folder"} 1.0' in metrics
    assert 'keyart_bundle_refusals_total{reason="bad_manifest"} 1.0' in metrics
    assert 'keyart_bundle_loads_total{outcome="ok"} 1.0' in metrics


# --- transient failures: retried with backoff, never blacklisted -------------------------

def test_a_transient_fetch_failure_is_retried_with_backoff_not_blacklisted(tmp_path, bundle_dir, monkeypatch):
    path, _ = bundle_dir
    store, events = recording_store(Settings(), str(path))
    store.retry_base_s = 0.2
    real = store.resolver.fetch
    failures = {"left": 3}

    def flaky(found):
        if failures["left"]:
            failures["left"] -= 1
            raise OSError(5, "Input/output error")
        return real(found)

    monkeypatch.setattr(store.resolver, "fetch", flaky)
    attempts = []
    deadline = time.monotonic() + 30
    while store.current is None and time.monotonic() < deadline:
        before = failures["left"]
        store.poll_once()
        attempts.append((time.monotonic(), before - failures["left"]))
        time.sleep(0.02)
    assert store.current is not None and store.current.version == "v1" and not store.bad
    failed = [(e, f) for e, f in events if e == "bundle_fetch_failed"]
    assert [f["attempt"] for _, f in failed] == [1, 2, 3]
    assert [f["retry_in_s"] for _, f in failed] == [0.2, 0.4, 0.8]  # doubling
    tried = [t for t, n in attempts if n]
    gaps = [b - a for a, b in zip(tried, tried[1:], strict=False)]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4  # no attempt before its retry is due
    assert store.next_attempt_in() is None


def test_backoff_is_capped(tmp_path, bundle_dir, monkeypatch):
    path, _ = bundle_dir
    store, events = recording_store(Settings(), str(path))
    store.retry_base_s, store.retry_max_s = 0.001, 0.004

    def down(found):
        raise ConnectionError("artifact store unreachable")

    monkeypatch.setattr(store.resolver, "fetch", down)
    for _ in range(8):
        store.poll_once()
        time.sleep(0.006)
    delays = [f["retry_in_s"] for e, f in events if e == "bundle_fetch_failed"]
    assert len(delays) == 8 and max(delays) == 0.004 and store.current is None and not store.bad


@pytest.mark.mlflow
def test_registry_outage_while_fetching_the_new_champion_then_recovery(tmp_path, _isolated_home, lgbm_model,
                                                                       lgbm_model_b, monkeypatch):
    import mlflow.artifacts

    s = Settings()
    client, exp = new_registry(s)
    make_bundle(tmp_path / "b1", lgbm_model, "v1")
    make_bundle(tmp_path / "b2", lgbm_model_b, "v2")
    register(client, s.registered_model, exp, tmp_path / "b1", "champion")
    store, events = recording_store(s)
    store.retry_base_s = 0.05
    assert store.poll_once() is True and store.current.registry_version == "1"

    register(client, s.registered_model, exp, tmp_path / "b2", "champion")
    real = mlflow.artifacts.download_artifacts

    def outage(*args, **kwargs):
        raise ConnectionError("artifact store: connection refused")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", outage)
    assert store.poll_once() is False and store.current.version == "v1"  # the last good keeps serving
    assert names(events)[-1] == "bundle_fetch_failed" and not store.bad

    real_client = registry.client

    def unreachable(*args, **kwargs):
        raise ConnectionError("registry unreachable")

    monkeypatch.setattr(registry, "client", unreachable)
    time.sleep(0.06)
    assert store.poll_once() is False and names(events)[-1] == "bundle_resolve_failed"

    monkeypatch.setattr(registry, "client", real_client)
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", real)
    time.sleep(0.11)
    assert store.poll_once() is True
    assert store.current.version == "v2" and store.current.registry_version == "2"
    assert store.current.signed_by == kb.key_id(kb.signing_key().public_key())


@pytest.mark.mlflow
def test_a_logged_bundle_model_carries_its_signature_through_the_registry(tmp_path, _isolated_home, lgbm_model):
    s = Settings()
    client, exp = new_registry(s)
    make_bundle(tmp_path / "b1", lgbm_model, "v1")
    registry.configure(s)
    run = client.create_run(exp)
    uri = registry.log_bundle_model(tmp_path / "b1", run.info.run_id)
    mv = registry.register_version(uri, {}, s)
    client.set_registered_model_alias(s.registered_model, "champion", mv.version)
    local = registry.download_bundle(mv.version, s)
    assert (local / kb.SIGNATURE_FILE).read_bytes() == (tmp_path / "b1" / kb.SIGNATURE_FILE).read_bytes()
    store, _ = recording_store(s)
    assert store.poll_once() is True and store.current.signed_by is not None
