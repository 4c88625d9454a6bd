"""Schemathesis fuzzes every operation of /openapi.json in-process: no 5xx, answers match the schema."""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis import checks
from serving_fixtures import make_bundle

from keyart import config
from keyart.serving.app import create_app

CHECKS = [checks.not_a_server_error, checks.status_code_conformance,
          checks.content_type_conformance, checks.response_schema_conformance]

# Settings are read when the lifespan starts (in the fixture below, with an event secret),
# not here: the schema is taken from the app without starting it.
APP = create_app(poll=False)
schema = schemathesis.openapi.from_dict(APP.openapi())
schema.app = APP


@pytest.fixture(scope="module")
def running_app(tmp_path_factory, lgbm_model):
    home = tmp_path_factory.mktemp("fuzz-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KEYART_HOME", str(home))
        mp.setenv("KEYART_SERVE_MODEL_URI", str(home / "bundle"))
        mp.setenv("KEYART_SERVE_EVENT_SECRET", "fuzz-tests-event-secret-" + "0" * 40)
        # named explicitly: each test's own KEYART_HOME (autouse fixture) would otherwise hide it
        mp.setenv("KEYART_SERVE_BUNDLE_PUBLIC_KEY", str(home / "keys" / "bundle-signing.pub"))
        config.settings.cache_clear()
        make_bundle(home / "bundle", lgbm_model, "v1")  # signed with the key generated under this home
        with TestClient(APP):  # runs the lifespan once; fuzzed calls reuse the loaded runtime
            assert APP.state.runtime.store.current is not None
            yield APP
    config.settings.cache_clear()


@schema.parametrize()
@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_fuzz_finds_no_server_error(case, running_app):
    case.call_and_validate(checks=CHECKS)
