"""deploy/ names only what exists: settings, probe paths, port names, and (with a running service) metrics."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import fields
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from agentworker.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "kubernetes" / "base"


def load_check_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_check", DEPLOY / "check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def base_doc(file_name: str) -> dict[str, Any]:
    doc = yaml.safe_load((BASE / file_name).read_text())
    assert isinstance(doc, dict)
    return doc


def test_env_example_lists_every_setting() -> None:
    text = (DEPLOY / ".env.example").read_text()
    listed = set(re.findall(r"^# (AGENTWORKER_[A-Z_]+)=", text, flags=re.MULTILINE))
    expected = {ENV_PREFIX + f.name.upper() for f in fields(Settings)}
    assert listed == expected


def test_settings_docstring_lists_every_setting() -> None:
    import agentworker.settings as module

    doc = module.__doc__ or ""
    for f in fields(Settings):
        assert ENV_PREFIX + f.name.upper() in doc, f.name


def test_probes_and_ports_match_the_service() -> None:
    deployment = base_doc("deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": Settings().port}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["AGENTWORKER_PORT"] == str(ports["http"])
    probes = {name: container[name]["httpGet"] for name in ("livenessProbe", "readinessProbe", "startupProbe")}
    assert probes["livenessProbe"]["path"] == "/health"
    assert probes["startupProbe"]["path"] == "/health"
    assert probes["readinessProbe"]["path"] == "/ready"
    assert {p["port"] for p in probes.values()} == {"http"}
    # Kubernetes must wait longer than the supervisor's drain.
    grace = float(env["AGENTWORKER_SHUTDOWN_GRACE"])
    assert pod["terminationGracePeriodSeconds"] >= grace + 10

    service = base_doc("service.yaml")
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == "http"
    monitor = base_doc("servicemonitor.yaml")
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [service_port["name"]]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    policy = base_doc("networkpolicy.yaml")
    assert policy["spec"]["ingress"][0]["ports"][0]["port"] == "http"
    # Labels that select the pods agree everywhere.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    assert service["spec"]["selector"] == labels
    assert base_doc("pdb.yaml")["spec"]["selector"]["matchLabels"] == labels
    assert policy["spec"]["podSelector"]["matchLabels"] == labels
    assert monitor["spec"]["selector"]["matchLabels"] == labels
    # The quota file is mounted as a directory (no subPath), so ConfigMap updates reach it.
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert "subPath" not in mounts["quotas"]
    assert env["AGENTWORKER_CONFIG"].startswith(mounts["quotas"]["mountPath"] + "/")


def test_dockerfile_healthcheck_and_entrypoint() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert f"http://127.0.0.1:{Settings().port}/health" in text
    assert 'ENTRYPOINT ["agentworker"]' in text and 'CMD ["run"]' in text
    assert re.search(r"^USER 10001", text, flags=re.MULTILINE)


@pytest.mark.parametrize(("kind", "mutate", "message"), [
    ("servicemonitor.yaml", lambda d: d["spec"]["endpoints"][0].update(prot="metrics"), "prot"),
    ("scaledobject.yaml", lambda d: d["spec"].pop("triggers"), "triggers"),
    ("scaledobject.yaml", lambda d: d["spec"].update(minReplicaCount="two"), "two"),
])
def test_custom_resources_are_validated_strictly(kind: str, mutate: Any, message: str) -> None:
    check = load_check_module()
    doc = base_doc(kind)
    api_version = doc["apiVersion"]
    schema = check.crd_schema(check.CUSTOM_KINDS[(api_version, doc["kind"])], api_version.split("/")[1])
    import jsonschema

    assert list(jsonschema.Draft7Validator(schema).iter_errors(doc)) == []
    mutate(doc)
    errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
    assert errors and any(message in e for e in errors), errors


def metric_names_used_by_deploy() -> set[str]:
    """Every agentworker_* series named by the dashboard, the alert rules and the ScaledObject."""
    texts = [
        (DEPLOY / "grafana" / "agentworker-dashboard.json").read_text(),
        (DEPLOY / "prometheus" / "alerts.yaml").read_text(),
        (BASE / "scaledobject.yaml").read_text(),
    ]
    names: set[str] = set()
    for text in texts:
        for name in re.findall(r"\bagentworker_[a-z_]+\b", text):
            names.add(re.sub(r"_(bucket|sum|count)$", "", name))
    return names




@pytest.fixture
def supervisors(redis_url: str, tmp_path: Path) -> Any:
    from tests.supervisor_helpers import supervisor_factory

    yield from supervisor_factory(redis_url, tmp_path)


@pytest.mark.slow
async def test_every_metric_named_by_deploy_is_exported_by_a_running_service(
        redis_url: str, database_url: str, write_quotas: Any, supervisors: Any) -> None:
    """The dashboard, the alerts and the ScaledObject query only series that a real `agentworker run`
    exposes on /metrics once it has run jobs, workflow steps and an LLM call; probe paths answer."""
    from tests.conftest import make_client
    from tests.workflow_helpers import workflow_client, workflow_worker_env

    path = write_quotas({"pools": {"standard": {"shards": 2, "processes": 1, "concurrency": 4, "job_timeout": 60}},
                         "tenants": {"acme": {"max_concurrency": 2}}})
    sup = supervisors(path, **workflow_worker_env(database_url))
    await sup.wait_ready()
    async with make_client(redis_url, path) as client:
        await (await client.enqueue("echo", tenant_id="acme", payload={"message": "x"})).result(timeout=30)
        failing = await client.enqueue("probe_fail", tenant_id="acme")
        with pytest.raises(Exception, match="boom"):
            await failing.result(timeout=30)
    async with workflow_client(redis_url, path, database_url=database_url) as wf_client:
        await wf_client.save_workflow("acme", {"id": "hello", "steps": [
            {"id": "greet", "kind": "llm", "prompt": "Say hello to {{ input.name }}"}]})
        job = await wf_client.enqueue("execute_workflow", tenant_id="acme", payload={
            "workflow_id": "hello", "trigger": "manual", "input_data": {"name": "Ada"}})
        await job.result(timeout=60)

    for probe_path in ("/health", "/ready", "/metrics", "/status"):
        code, _headers, _body = await sup.request(probe_path)
        assert code == 200, probe_path
    exported = {name for name, _labels in (await sup.metrics())}
    families = {re.sub(r"_(bucket|sum|count|total|created)$", "", name) for name in exported}
    missing = sorted(name for name in metric_names_used_by_deploy()
                     if name not in exported and re.sub(r"_total$", "", name) not in families)
    assert missing == [], f"deploy/ names metrics the service does not export: {missing}"
