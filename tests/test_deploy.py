"""deploy/ names only what exists: settings, probe paths, port names, and (with a running service) metrics."""

from __future__ import annotations

import copy
import http.server
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
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
EXAMPLE = DEPLOY / "kubernetes" / "overlays" / "example"
DASHBOARD = DEPLOY / "grafana" / "agentworker-dashboard.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts.test.yaml"


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


def test_the_readme_lists_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    for f in fields(Settings):
        assert f"`{ENV_PREFIX}{f.name.upper()}`" in readme, f.name


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


def base_docs() -> list[dict[str, Any]]:
    """The base's manifests as written (no kustomize needed)."""
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in yaml.safe_load_all((BASE / name).read_text())
            if doc]


def rendered(target: Path) -> list[dict[str, Any]]:
    if not (shutil.which("kubectl") or shutil.which("kustomize")):
        pytest.skip("neither kubectl nor kustomize is installed")
    check = load_check_module()
    docs = check.render(target)
    assert docs and not check.problems, check.problems
    return list(docs)


def dockerfile_instruction(text: str, instruction: str) -> str:
    """One instruction, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    (line,) = [line for line in joined.splitlines() if line.startswith(instruction + " ")]
    return line


@pytest.fixture
def health_server() -> Iterator[int]:
    """A stand-in for the supervisor's HTTP port: /health answers 200, anything else 404."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_dockerfile_healthcheck_and_entrypoint() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["agentworker"]' in text and 'CMD ["run"]' in text
    assert re.search(r"^USER 10001", text, flags=re.MULTILINE)
    assert re.search(rf"^\s+AGENTWORKER_PORT={Settings().port}\b", text, flags=re.MULTILINE)
    assert re.search(rf"^EXPOSE {Settings().port}$", text, flags=re.MULTILINE)


def test_dockerfile_healthcheck_follows_agentworker_port(health_server: int) -> None:
    """The image's probe asks /health on the port AGENTWORKER_PORT names at run time, and the settings'
    default port when it is unset or empty."""
    line = dockerfile_instruction((ROOT / "Dockerfile").read_text(), "HEALTHCHECK")
    command = json.loads(line.split(" CMD ", 1)[1])
    assert command[0] == "python"
    argv = [sys.executable, *command[1:]]
    env = {k: v for k, v in os.environ.items() if k != "AGENTWORKER_PORT"}

    def probe(port: str | None) -> int:
        run_env = env if port is None else {**env, "AGENTWORKER_PORT": port}
        return subprocess.run(argv, env=run_env, capture_output=True, timeout=30, check=False).returncode

    assert probe(str(health_server)) == 0
    with socket_on_a_closed_port() as closed:
        assert probe(str(closed)) != 0
    assert f"'{Settings().port}'" in command[-1]  # unset or empty: the settings' default


class socket_on_a_closed_port:
    """A port nothing listens on (bound, never listening, for the block's duration)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def test_dockerfile_oci_labels() -> None:
    text = (ROOT / "Dockerfile").read_text()
    final_stage = text.rsplit("\nFROM ", 1)[1]
    label = dockerfile_instruction(final_stage, "LABEL")
    labels = dict(re.findall(r'(org\.opencontainers\.image\.[a-z]+)="([^"]*)"', label))
    for key in ("title", "description", "source", "licenses", "version", "revision"):
        assert f"org.opencontainers.image.{key}" in labels, key
    assert labels["org.opencontainers.image.title"] == "agentworker"
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    args = dict(re.findall(r"^ARG ([A-Z_]+)=(.*)$", final_stage, flags=re.MULTILINE))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert args["VERSION"] == project["version"]
    assert labels["org.opencontainers.image.description"] == project["description"]


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


def test_manifest_rules_pass_and_bite() -> None:
    """check.py's own manifest rules: the base passes them, and each fails once its fix is undone."""
    check = load_check_module()
    docs = base_docs()
    assert check.manifest_problems(docs, overlay=False) == []

    def problems_after(mutate: Any) -> list[str]:
        changed = copy.deepcopy(docs)
        by_kind = {d["kind"]: d for d in changed}
        mutate(by_kind)
        return list(check.manifest_problems(changed, overlay=False))

    def pod(by_kind: dict[str, Any]) -> Any:
        return by_kind["Deployment"]["spec"]["template"]["spec"]

    def trigger(by_kind: dict[str, Any]) -> Any:
        return by_kind["ScaledObject"]["spec"]["triggers"][0]["metadata"]

    cases = [
        (lambda k: k["Deployment"]["spec"].update(replicas=2), "sets replicas"),
        (lambda k: k["ScaledObject"]["spec"].pop("advanced"), "scaleDown"),
        (lambda k: k["ScaledObject"]["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
         .pop("policies"), "scaleDown"),
        (lambda k: trigger(k).update(query='max(agentworker_queue_runnable{pool="standard"})'), "not scoped"),
        (lambda k: pod(k)["initContainers"][0]["resources"]["limits"].pop("cpu"), "no cpu limit"),
        (lambda k: pod(k)["containers"][0]["resources"]["limits"].pop("memory"), "no memory limit"),
        (lambda k: pod(k)["initContainers"][0]["env"][0]["valueFrom"]["secretKeyRef"].update(
            name="agentworker-secrets"), "give migrations their own Secret"),
        (lambda k: pod(k)["containers"][0].setdefault("envFrom", []).append(
            {"secretRef": {"name": "agentworker-migrate"}}), "give migrations their own Secret"),
    ]
    for mutate, message in cases:
        found = problems_after(mutate)
        assert any(message in p for p in found), (message, found)
    # In a namespace, the query must select that namespace.
    in_other = copy.deepcopy(docs)
    for doc in in_other:
        doc["metadata"]["namespace"] = "elsewhere"
    assert any("selects namespace ['agentworker']" in p for p in check.manifest_problems(in_other, overlay=False))


def test_migrations_run_with_their_own_credential() -> None:
    """The init container migrates as a user of its own Secret; the service connects as another."""
    pod = base_doc("deployment.yaml")["spec"]["template"]["spec"]
    (migrate,) = pod["initContainers"]
    assert migrate["args"] == ["migrate"]
    # `agentworker migrate` reads AGENTWORKER_DATABASE_URL when --database-url is not given.
    (url,) = [e for e in migrate["env"] if e["name"] == "AGENTWORKER_DATABASE_URL"]
    migrate_ref = url["valueFrom"]["secretKeyRef"]
    (container,) = pod["containers"]
    (service_url,) = [e for e in container["env"] if e["name"] == "AGENTWORKER_DATABASE_URL"]
    service_ref = service_url["valueFrom"]["secretKeyRef"]
    assert migrate_ref["name"] != service_ref["name"]
    assert not migrate_ref.get("optional")
    assert set(migrate["resources"]["limits"]) >= {"cpu", "memory"}
    # The example overlay documents both Secrets, with the keys the Deployment reads.
    secrets = {d["metadata"]["name"]: d for d in yaml.safe_load_all((EXAMPLE / "secret.example.yaml").read_text())
               if d}
    assert migrate_ref["key"] in secrets[migrate_ref["name"]]["stringData"]
    assert service_ref["key"] in secrets[service_ref["name"]]["stringData"]
    migrate_user = secrets[migrate_ref["name"]]["stringData"][migrate_ref["key"]].split("//")[1].split(":")[0]
    service_user = secrets[service_ref["name"]]["stringData"][service_ref["key"]].split("//")[1].split(":")[0]
    assert migrate_user != service_user


def test_example_overlay_pins_the_image_by_digest_and_scopes_keda() -> None:
    check = load_check_module()
    docs = rendered(EXAMPLE)
    assert check.manifest_problems(docs, overlay=True) == []
    kustomization = yaml.safe_load((EXAMPLE / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", image["digest"]) and "newTag" not in image
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(deployments) == {"agentworker", "agentworker-webhooks"}  # the webhook ingress is included
    pods = [d["spec"]["template"]["spec"] for d in deployments.values()]
    assert {c["image"] for pod in pods for c in pod["containers"] + pod.get("initContainers", [])} == {
        f"{image['newName']}@{image['digest']}"}
    (scaled,) = [d for d in docs if d["kind"] == "ScaledObject"]
    assert f'namespace="{kustomization["namespace"]}"' in scaled["spec"]["triggers"][0]["metadata"]["query"]
    # Tagged images and a missing Secret are caught in an overlay.
    tagged = copy.deepcopy(docs)
    for d in tagged:
        if d["kind"] == "Deployment":
            d["spec"]["template"]["spec"]["containers"][0]["image"] = f"{image['newName']}:0.1.0"
    assert any("not pinned by digest" in p for p in check.manifest_problems(tagged, overlay=True))
    without_migrate = [d for d in docs
                       if not (d["kind"] == "Secret" and d["metadata"]["name"] == "agentworker-migrate")]
    assert any("reads Secret agentworker-migrate" in p for p in check.manifest_problems(without_migrate, overlay=True))


def test_keda_owns_the_replica_count_and_does_not_flap() -> None:
    deployment = base_doc("deployment.yaml")
    scaled = base_doc("scaledobject.yaml")
    assert "replicas" not in deployment["spec"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    scale_down = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert scale_down["stabilizationWindowSeconds"] >= 60
    assert all(p["type"] in ("Pods", "Percent") and p["value"] > 0 for p in scale_down["policies"])


def alert_rules() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return {rule["alert"]: rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule}


def test_alerts_are_actionable_and_tested() -> None:
    check = load_check_module()
    rules = yaml.safe_load(ALERTS.read_text())
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    assert check.alert_problems(rules, tests) == []
    # Each rule bites: a test file without the cases of an alert, an alert without severity.
    for alert in alert_rules():
        fewer = copy.deepcopy(tests)
        for test in fewer["tests"]:
            test["alert_rule_test"] = [c for c in test.get("alert_rule_test", []) if c["alertname"] != alert]
        assert any(alert in p and "fire" in p for p in check.alert_problems(rules, fewer)), alert
    broken = copy.deepcopy(rules)
    broken["groups"][0]["rules"][0]["labels"].pop("severity")
    broken["groups"][0]["rules"][0]["annotations"].pop("description")
    found = check.alert_problems(broken, tests)
    assert any("severity" in p for p in found) and any("no description" in p for p in found)


@pytest.mark.parametrize(("alert", "needle"), [
    ("AgentworkerRedisDown", "agentworker_redis_up"),
    ("AgentworkerTargetDown", "up{job="),
    ("AgentworkerTargetAbsent", "absent(up{job="),
    ("AgentworkerSupervisorLoopStale", "agentworker_supervisor_loop_age_seconds"),
    ("AgentworkerPoolCrashLooping", "agentworker_pool_failing"),
    ("AgentworkerNoLiveWorkers", "agentworker_worker_processes"),
    ("AgentworkerDeadLettersGrowing", "increase(agentworker_dead_letters_total"),
    ("AgentworkerJobsRejected", 'agentworker_jobs_total{outcome="rejected"}'),
    ("AgentworkerWebhooksRefused", "agentworker_webhooks_total"),
    ("AgentworkerLLMBudgetExhausted", "agentworker_llm_budget_exhausted_total"),
])
def test_operator_alerts_exist(alert: str, needle: str) -> None:
    assert needle in alert_rules()[alert]["expr"]


def test_alerts_name_the_scrape_job_the_service_monitor_makes() -> None:
    """Without a jobLabel the Prometheus Operator names the job after the Service."""
    monitor = base_doc("servicemonitor.yaml")
    assert "jobLabel" not in monitor["spec"]
    service = base_doc("service.yaml")["metadata"]["name"]
    webhooks = yaml.safe_load((DEPLOY / "kubernetes" / "webhooks" / "service.yaml").read_text())["metadata"]["name"]
    jobs = {job for rule in alert_rules().values() for job in re.findall(r'\bjob="([^"]*)"', rule["expr"])}
    assert jobs == {service, webhooks}
    for name, rule in alert_rules().items():  # the ingress's series are its job's, the others the service's
        if "agentworker_webhook_request" in rule["expr"]:
            assert f'job="{webhooks}"' in rule["expr"], name
    for name in ("AgentworkerTargetDown", "AgentworkerTargetAbsent"):
        assert f'job="{service}"' in alert_rules()[name]["expr"]


def dashboard() -> dict[str, Any]:
    doc = json.loads(DASHBOARD.read_text())
    assert isinstance(doc, dict)
    return doc


def dashboard_exprs(doc: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    return [(panel, target["expr"]) for panel in doc["panels"] for target in panel.get("targets", [])]


def test_dashboard_filters_every_query_by_namespace_and_instance() -> None:
    check = load_check_module()
    doc = dashboard()
    assert check.dashboard_problems(doc) == []
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert not variables["namespace"]["multi"] and not variables["namespace"]["includeAll"]
    assert variables["instance"]["includeAll"] and variables["instance"]["allValue"] == ".*"

    def problems_after(mutate: Any) -> list[str]:
        changed = copy.deepcopy(doc)
        mutate(changed)
        return list(check.dashboard_problems(changed))

    def first_target(d: dict[str, Any]) -> dict[str, Any]:
        return next(p for p in d["panels"] if p.get("targets"))["targets"][0]  # type: ignore[no-any-return]

    def set_variable(name: str, **changes: Any) -> Any:
        def mutate(d: dict[str, Any]) -> None:
            next(v for v in d["templating"]["list"] if v["name"] == name).update(changes)
        return mutate

    cases = [
        (lambda d: first_target(d).update(expr=first_target(d)["expr"].replace(', instance=~"$instance"', "")),
         'lacks instance=~"$instance"'),
        (lambda d: first_target(d).update(expr=first_target(d)["expr"].replace('namespace=~"$namespace", ', "")),
         'lacks namespace=~"$namespace"'),
        (lambda d: first_target(d).update(expr="sum(rate(agentworker_jobs_total[5m]))"), "without a"),
        (lambda d: first_target(d).update(expr='max(kube_pod_container_resource_limits{namespace=~"$namespace"})'),
         "queries no agentworker_* series"),
        (set_variable("namespace", multi=True), "several namespaces"),
        (lambda d: d["templating"]["list"].remove(next(v for v in d["templating"]["list"] if v["name"] == "instance")),
         "no 'instance' query variable"),
        (set_variable("pool", query={"query": "label_values(agentworker_worker_processes, pool)", "refId": "p"}),
         "variable 'pool'"),
    ]
    for mutate, message in cases:
        found = problems_after(mutate)
        assert any(message in p for p in found), (message, found)


#: worker-side series whose tenant label is a tenant the quota file names or "other" (metrics.tenant_label)
TENANT_SERIES_WITH_OTHER = {"agentworker_tenant_jobs_total", "agentworker_tenant_jobs_in_progress",
                            "agentworker_jobs_deferred_total", "agentworker_llm_tokens_total",
                            "agentworker_llm_budget_exhausted_total"}


def test_tenant_panels_show_the_other_tenant() -> None:
    """Tenants the quota file does not name count as `other`: no tenant panel hides them, and each shows
    an `other` series, or says why the series it draws has none."""
    import agentworker.metrics as metrics

    declared = {getattr(m, "_name", "") for m in vars(metrics).values()}
    for name in TENANT_SERIES_WITH_OTHER:
        metric = next(m for m in vars(metrics).values() if getattr(m, "_name", None) == name.removesuffix("_total"))
        assert "tenant" in metric._labelnames, name
    assert {n.removesuffix("_total") for n in TENANT_SERIES_WITH_OTHER} <= declared
    tenant_panels = [panel for panel in dashboard()["panels"]
                     if any(re.search(r"by \([^)]*\btenant\b", t["expr"]) for t in panel.get("targets", []))]
    assert len(tenant_panels) >= 6
    for panel in tenant_panels:
        exprs = [t["expr"] for t in panel["targets"]]
        for expr in exprs:
            for op, value in re.findall(r'\btenant\s*(=~|!~|!=|=)\s*"([^"]*)"', expr):
                assert op == "=" and value == "other", (panel["title"], expr)
        names = {n for expr in exprs for n in re.findall(r"\bagentworker_[a-z_]+", expr)}
        if not names & TENANT_SERIES_WITH_OTHER:
            assert "other" in panel["description"], panel["title"]
    (in_flight,) = [p for p in tenant_panels if p["title"] == "Tenants: in-flight jobs"]
    assert any('tenant="other"' in t["expr"] for t in in_flight["targets"])


@pytest.mark.parametrize("needle", [
    "agentworker_jobs_deferred_total",
    "agentworker_worker_resident_memory_bytes",
    'kube_pod_container_resource_limits{namespace=~"$namespace", container="agentworker", resource="memory"}',
    "agentworker_supervisor_loop_age_seconds",
    "agentworker_schedule_dispatches_total",
    "agentworker_polls_total",
    "agentworker_webhooks_total",
    "sum by (tenant, kind) (rate(agentworker_llm_tokens_total",
    "agentworker_llm_budget_remaining_tokens",
    "agentworker_llm_budget_exhausted_total",
    "agentworker_dead_letter_entries",
])
def test_dashboard_has_a_panel_for(needle: str) -> None:
    assert any(needle in expr for _panel, expr in dashboard_exprs(dashboard())), needle


def test_dashboard_memory_limit_matches_the_container() -> None:
    (container,) = base_doc("deployment.yaml")["spec"]["template"]["spec"]["containers"]
    exprs = [expr for _panel, expr in dashboard_exprs(dashboard()) if "kube_pod_container_resource_limits" in expr]
    assert exprs and all(f'container="{container["name"]}"' in expr for expr in exprs)


def declared_metric_names() -> set[str]:
    """agentworker_* families the code declares: agentworker/metrics.py and the supervisor's collector."""
    import agentworker.metrics as metrics

    names: set[str] = set()
    for value in vars(metrics).values():
        name = getattr(value, "_name", None)
        if isinstance(name, str) and name.startswith("agentworker_"):
            names.add(name)
            if getattr(value, "_type", None) == "counter":
                names.add(name + "_total")
    report = (ROOT / "agentworker" / "supervisor" / "report.py").read_text()
    names |= set(re.findall(r'MetricFamily\(\s*"(agentworker_[a-z_]+)"', report))
    return names | set(INGRESS_METRICS)


#: the webhook ingress's metrics (`agentworker webhooks`, its own registry and port): the supervisor does not
#: export them; tests/test_webhook_ingress.py checks the ingress does
INGRESS_METRICS = {"agentworker_webhook_requests_total", "agentworker_webhook_request_duration_seconds"}


def test_the_ingress_metrics_are_the_ones_the_ingress_declares() -> None:
    from agentworker.ingress.app import IngressMetrics

    declared = {metric.name for metric in IngressMetrics().registry.collect()}
    assert {re.sub(r"_total$", "", name) for name in INGRESS_METRICS} <= declared


def test_every_metric_named_by_deploy_is_declared() -> None:
    """Fast and without services: deploy/ names no series the code does not declare (a typo, or a metric
    that was renamed). The slow test below checks a running service really exports those it can."""
    missing = sorted(metric_names_used_by_deploy() - declared_metric_names())
    assert missing == [], f"deploy/ names metrics agentworker does not declare: {missing}"


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




#: series that appear only once their event has happened (a counter's labelled child is created on its
#: first increment): the run below does not make them happen; test_every_metric_named_by_deploy_is_declared
#: covers their names
ONLY_AFTER_THEIR_EVENT = {
    "agentworker_dead_letters_total",  # a queue entry no worker can read
    "agentworker_jobs_deferred_total",  # a tenant at its max_concurrency, or out of LLM budget
    "agentworker_llm_budget_exhausted_total",  # a model call refused by the tenant's llm_tokens budget
    "agentworker_llm_tokens_total",  # a provider reporting token usage (the offline model reports none)
    "agentworker_polls_total",  # a tenant's poll source polled
    "agentworker_schedule_dispatches_total",  # a tenant schedule due
    "agentworker_webhooks_total",  # a webhook received
}


@pytest.fixture
def supervisors(redis_url: str, tmp_path: Path) -> Any:
    from tests.supervisor_helpers import supervisor_factory

    yield from supervisor_factory(redis_url, tmp_path)


@pytest.mark.slow
async def test_every_metric_named_by_deploy_is_exported_by_a_running_service(
        redis_url: str, database_url: str, write_quotas: Any, supervisors: Any) -> None:
    """The dashboard, the alerts and the ScaledObject query only series that a real `agentworker run`
    exposes on /metrics once it has run jobs, workflow steps and an LLM call of a tenant with an LLM
    budget (but those of ONLY_AFTER_THEIR_EVENT); probe paths answer."""
    from tests.conftest import make_client
    from tests.workflow_helpers import workflow_client, workflow_worker_env

    path = write_quotas({"pools": {"standard": {"shards": 2, "processes": 1, "concurrency": 4, "job_timeout": 60}},
                         "tenants": {"acme": {"max_concurrency": 2, "llm_tokens": "1000000/h"}}})
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
    assert metric_names_used_by_deploy() >= ONLY_AFTER_THEIR_EVENT
    missing = sorted(name for name in metric_names_used_by_deploy() - ONLY_AFTER_THEIR_EVENT - INGRESS_METRICS
                     if name not in exported and re.sub(r"_total$", "", name) not in families)
    assert missing == [], f"deploy/ names metrics the service does not export: {missing}"
