"""infra/: the Kubernetes manifests validate offline, and no secret has a value anywhere.

The kustomize base (infra/k8s/kustomization.yaml) is rendered here the way ``kubectl
kustomize`` renders it for what the base uses (namespace, labels, images, ConfigMap
generators), and every object is validated with ``kubernetes-validate`` against the
Kubernetes API schema of one version, strictly (unknown fields are errors). The Airflow
chart's values are checked for the secrets they must take from Secrets, and their extra
env / volumes are validated as parts of a Pod. The stack's generated files (make up) are
checked too: the settings file is private, HAProxy accepts its configuration.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
K8S_VERSION = "1.33.0"
NOT_RESOURCES = {"kustomization.yaml", "airflow-values.yaml"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}
SECRET_NAME = re.compile(r"SECRET|PASSWORD|API_KEYS|TOKEN|FERNET|BACKEND_STORE_URI|ACCESS_KEY")


def _kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def render() -> list[dict]:
    """The objects `kubectl kustomize infra/k8s` prints, for the features the base uses."""
    kz = _kustomization()
    objects: list[dict] = []
    for resource in kz["resources"]:
        objects += [doc for doc in yaml.safe_load_all((K8S / resource).read_text()) if doc]
    for gen in kz.get("configMapGenerator", []):
        data = {}
        for literal in gen.get("literals", []):
            key, _, value = literal.partition("=")
            data[key] = value
        for name in gen.get("files", []):
            data[Path(name).name] = (K8S / name).read_text()
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    images = {i["name"]: f"{i['newName']}:{i['newTag']}" for i in kz.get("images", [])}
    out = []
    for obj in objects:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if obj["kind"] not in CLUSTER_SCOPED:
            meta["namespace"] = kz["namespace"]
        for entry in kz.get("labels", []):
            meta.setdefault("labels", {}).update(entry["pairs"])
        for container in _containers(obj):
            container["image"] = images.get(container["image"], container["image"])
        out.append(obj)
    return out


def _pod_spec(obj: dict) -> dict | None:
    spec = obj.get("spec", {})
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return spec["template"]["spec"]
    if obj["kind"] == "Pod":
        return spec
    return None


def _containers(obj: dict) -> list[dict]:
    pod = _pod_spec(obj)
    return [] if pod is None else pod.get("containers", []) + pod.get("initContainers", [])


def _by(objects: list[dict], kind: str, name: str) -> dict:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return render()


def test_every_manifest_file_is_in_the_kustomization():
    listed = set(_kustomization()["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - NOT_RESOURCES
    assert on_disk == listed


def test_every_object_validates_against_the_kubernetes_schema(objects):
    import kubernetes_validate

    kinds = set()
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")
        kinds.add(obj["kind"])
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "StatefulSet", "ConfigMap",
            "PersistentVolumeClaim", "ServiceAccount", "Role", "RoleBinding"} <= kinds


def test_an_invalid_object_is_refused():
    import kubernetes_validate

    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
           "spec": {"replicas": "two", "selector": {}, "template": {}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_serving_is_probed_on_readyz_and_healthz_and_scaled_on_cpu(objects):
    serving = _by(objects, "Deployment", "keyart-serving")
    (container,) = _containers(serving)
    assert container["image"] == "registry.example.com/keyart:0.1.0"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert serving["spec"]["replicas"] >= 2
    hpa = _by(objects, "HorizontalPodAutoscaler", "keyart-serving")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "keyart-serving"}
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    service = _by(objects, "Service", "keyart-serving")
    assert service["spec"]["selector"] == serving["spec"]["selector"]["matchLabels"]
    assert container["resources"]["requests"]["cpu"], "the HPA needs a CPU request"


def test_secrets_come_from_secret_key_refs_and_none_is_in_the_manifests(objects):
    assert not [o for o in objects if o["kind"] == "Secret"], "Secrets are created by the operator, not kept here"
    refs = set()
    for obj in objects:
        for container in _containers(obj):
            for env in container.get("env", []):
                if SECRET_NAME.search(env["name"]):
                    assert "valueFrom" in env and "secretKeyRef" in env["valueFrom"], (obj["metadata"]["name"], env)
                    ref = env["valueFrom"]["secretKeyRef"]
                    assert not ref.get("optional", False), f"{env['name']} must not fall back to a default"
                    refs.add(ref["name"])
                elif "value" in env and "$(" in env["value"]:
                    # composed from another variable: only from one that is itself a secretKeyRef
                    names = re.findall(r"\$\((\w+)\)", env["value"])
                    defined = {e["name"]: e for e in container["env"]}
                    for name in names:
                        assert "secretKeyRef" in defined[name].get("valueFrom", {}), (env, name)
    assert {"keyart-serving", "keyart-redis", "keyart-mlflow"} <= refs
    readme = (ROOT / "infra" / "README.md").read_text()
    for name in refs:
        assert name in readme, f"infra/README.md must say how to create Secret {name}"
    config = _by(objects, "ConfigMap", "keyart-config")["data"]
    assert not [k for k in config if SECRET_NAME.search(k)], "no secret in the ConfigMap"


def test_no_literal_secret_value_in_any_infra_file():
    """Nothing that looks like a key: long hex or base64 runs, or a password/secret field with a value."""
    token = re.compile(r"(?<![\w/.-])(?:[0-9a-fA-F]{32,}|[A-Za-z0-9+/_-]{40,}={0,2})(?![\w/.-])")
    field = re.compile(r"^\s*-?\s*(\w*(?:password|passwd|secret|token|fernetkey|apikey|pass)\w*)\s*:\s*(\S.*)$", re.I)
    allowed_fields = re.compile(r"(secretname|secretkeyref|secretkeysecretname|jwtsecretname|passwordsfile"
                                r"|simple_auth_manager_passwords_file|_secret_name)$", re.I)
    for path in sorted((ROOT / "infra").rglob("*")):
        if not path.is_file() or path.suffix not in (".yaml", ".yml", ".conf", ".example", ".env", ".cfg"):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            assert not token.search(code), f"{path.relative_to(ROOT)}:{n}: looks like a literal key: {line.strip()}"
            m = field.match(code)
            if m and not allowed_fields.search(m.group(1)) and m.group(2).strip() not in ("~", "null", '""', "''", "|", "|-"):
                value = m.group(2).strip()
                assert value.startswith(("keyart-", "{")) or "CHANGE_ME" in value, \
                    f"{path.relative_to(ROOT)}:{n}: a secret field with a value: {line.strip()}"


def _values() -> dict:
    return yaml.safe_load((K8S / "airflow-values.yaml").read_text())


def test_airflow_values_take_every_secret_from_a_secret():
    values = _values()
    assert values["executor"] in ("KubernetesExecutor", "CeleryExecutor", "LocalExecutor")
    assert values["postgresql"]["enabled"] is False
    assert values["data"]["metadataSecretName"]
    assert "metadataConnection" not in values["data"]  # the chart's default is user/pass postgres
    for key in ("fernetKeySecretName", "apiSecretKeySecretName", "jwtSecretName"):
        assert values[key].startswith("keyart-"), key
    for literal in ("fernetKey", "webserverSecretKey", "apiSecretKey", "jwtSecret"):
        assert not values.get(literal), f"{literal} must come from a Secret"
    core = values["config"]["core"]
    assert core["simple_auth_manager_all_admins"] == "False"
    assert "patch_airflow_runtime()" in values["airflowLocalSettings"]
    readme = (ROOT / "infra" / "README.md").read_text()
    names = [values["data"]["metadataSecretName"], values["fernetKeySecretName"], values["apiSecretKeySecretName"],
             values["jwtSecretName"]]
    names += [v["secret"]["secretName"] for v in values["volumes"] if "secret" in v]
    for name in names:
        assert name in readme, f"infra/README.md must say how to create Secret {name}"


def test_airflow_values_env_and_volumes_are_valid_pod_parts():
    import kubernetes_validate

    values = _values()
    pod = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "airflow-task", "namespace": "keyart"},
        "spec": {
            "serviceAccountName": "airflow-worker",
            "containers": [{"name": "base", "image": f"{values['defaultAirflowRepository']}:{values['defaultAirflowTag']}",
                            "env": yaml.safe_load(values["extraEnv"]),
                            "envFrom": yaml.safe_load(values["extraEnvFrom"]),
                            "volumeMounts": values["volumeMounts"]}],
            "volumes": values["volumes"],
        },
    }
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert env["SPARK_LOCAL_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"


def _mounted_file(container: dict, volumes: list[dict], path: str) -> dict:
    """The volume that holds ``path`` in ``container``, with the item it projects there."""
    mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/"))
    volume = next(v for v in volumes if v["name"] == mount["name"])
    rel = path[len(mount["mountPath"].rstrip("/")) + 1:]
    source = volume.get("configMap") or volume.get("secret")
    assert source is not None, volume
    assert any(item["path"] == rel for item in source["items"]), (path, volume)
    assert mount.get("readOnly") is True, mount
    return volume


def test_serving_mounts_the_bundle_public_key_and_the_task_pods_the_private_one(objects):
    """Outside dev mode serving refuses a bundle it cannot verify: its pods read the public
    key from a ConfigMap (never the private half), the Airflow task pods sign with the
    private key from a Secret, and both are named in infra/README.md."""
    import kubernetes_validate

    serving = _by(objects, "Deployment", "keyart-serving")
    (container,) = _containers(serving)
    env = {e["name"]: e for e in container["env"]}
    public = env["KEYART_SERVE_BUNDLE_PUBLIC_KEY"]["value"]
    assert "KEYART_SERVE_DEV_MODE" not in env and "KEYART_BUNDLE_SIGNING_KEY" not in env
    volume = _mounted_file(container, _pod_spec(serving)["volumes"], public)
    assert volume["configMap"]["name"] == "keyart-bundle-public-key" and not volume["configMap"].get("optional")
    assert not [v for v in _pod_spec(serving)["volumes"] if "secret" in v and "signing" in v["secret"]["secretName"]]

    workers = _values()["workers"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "airflow-task", "namespace": "keyart"},
           "spec": {"containers": [{"name": "base", "image": "keyart", "env": workers["env"],
                                    "volumeMounts": workers["extraVolumeMounts"]}],
                    "volumes": workers["extraVolumes"]}}
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    (task,) = pod["spec"]["containers"]
    private = {e["name"]: e for e in task["env"]}["KEYART_BUNDLE_SIGNING_KEY"]["value"]
    secret = _mounted_file(task, workers["extraVolumes"], private)["secret"]
    assert secret["secretName"] == "keyart-bundle-signing"
    readme = (ROOT / "infra" / "README.md").read_text()
    assert "keyart-bundle-signing" in readme and "keyart-bundle-public-key" in readme


def test_spark_runs_on_kubernetes_with_the_keyart_image(objects):
    config = _by(objects, "ConfigMap", "keyart-config")["data"]
    assert config["KEYART_SPARK_MASTER"].startswith("k8s://")
    conf = dict(line.split(None, 1) for line in _by(objects, "ConfigMap", "keyart-spark-defaults")["data"]
                ["spark-defaults.conf"].splitlines() if line.strip() and not line.startswith("#"))
    image = next(f"{i['newName']}:{i['newTag']}" for i in _kustomization()["images"] if i["name"] == "keyart")
    assert conf["spark.kubernetes.container.image"].strip() == image
    assert conf["spark.kubernetes.namespace"].strip() == _kustomization()["namespace"]
    sa = conf["spark.kubernetes.authenticate.serviceAccountName"].strip()
    assert _by(objects, "ServiceAccount", sa)
    binding = _by(objects, "RoleBinding", "keyart-spark-driver")
    assert {s["name"] for s in binding["subjects"]} >= {"airflow-worker", sa}


# --- the stack's generated files (make up) -----------------------------------------------

def test_the_stack_settings_file_is_private_and_secrets_are_fresh(tmp_path):
    from keyart.demo import stack

    first = stack.load_or_create_env(tmp_path / "a", name="kunit", free_ports=True)
    second = stack.generate_env(tmp_path / "b", name="kunit", free_ports=True)
    assert stack.env_path(tmp_path / "a").stat().st_mode & 0o777 == 0o600
    assert stack.read_env(tmp_path / "a") == first
    for key in ("KEYART_SERVE_EVENT_SECRET", "AIRFLOW__API_AUTH__JWT_SECRET", "STACK_AIRFLOW_DB_PASSWORD",
                "KEYART_SERVE_API_KEYS", "AIRFLOW__CORE__FERNET_KEY", "STACK_SPARK_AUTH_SECRET"):
        assert first[key] and first[key] != second[key], key
    assert len(first["KEYART_SERVE_EVENT_SECRET"]) >= 32
    ports = [int(v) for k, v in first.items() if k.startswith("STACK_PORT_") and k != "STACK_PORT_PG"]
    assert len(set(ports)) == len(ports)
    assert first["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == f"http://127.0.0.1:{first['STACK_PORT_AIRFLOW']}/execution/"
    assert first["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
    assert first["KEYART_SPARK_MASTER"] == f"spark://127.0.0.1:{first['STACK_PORT_SPARK_MASTER']}"


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed (apt-get install haproxy)")
def test_haproxy_accepts_the_generated_configuration(tmp_path):
    from keyart.demo import stack

    env = stack.generate_env(tmp_path, name="kunit", free_ports=True)
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(stack.haproxy_config(env))
    proc = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = cfg.read_text()
    assert "uri /readyz" in text and text.count("server serve-") == 2
    assert "0.0.0.0" not in text and "bind 127.0.0.1:" in text


def test_the_standalone_master_workers_and_clients_share_a_generated_spark_secret(tmp_path):
    """spark.authenticate on, with the stack's own secret, in the one private file the
    master, the workers and spark-submit all read (SPARK_CONF_DIR/spark-defaults.conf); a
    settings file from before the secret existed gets one on the next up."""
    from keyart.demo import stack

    env = stack.load_or_create_env(tmp_path / "a", name="kunit", free_ports=True)
    stack._write_spark_conf(env)
    conf = Path(env["SPARK_CONF_DIR"]) / "spark-defaults.conf"
    assert conf.stat().st_mode & 0o777 == 0o600
    settings = dict(line.split(None, 1) for line in conf.read_text().splitlines() if line and not line.startswith("#"))
    assert settings["spark.authenticate"] == "true"
    assert settings["spark.authenticate.secret"] == env["STACK_SPARK_AUTH_SECRET"] and len(env["STACK_SPARK_AUTH_SECRET"]) >= 32
    assert settings["spark.master"] == env["KEYART_SPARK_MASTER"]
    assert env["STACK_SPARK_AUTH_SECRET"] not in " ".join(" ".join(c.argv) for c in stack.components(env)
                                                          if c.name.startswith("spark"))

    old = {k: v for k, v in env.items() if k not in ("STACK_SPARK_AUTH_SECRET", "KEYART_SERVE_CLIENT_CLOCK")}
    stack.write_env(tmp_path / "a", old)
    again = stack.load_or_create_env(tmp_path / "a", name="kunit")
    assert len(again["STACK_SPARK_AUTH_SECRET"]) >= 32 and again["KEYART_SERVE_CLIENT_CLOCK"] == "false"
    assert stack.read_env(tmp_path / "a") == again
    assert stack.serving_clock(again) == "wall"
