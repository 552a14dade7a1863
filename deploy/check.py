"""Validate everything under deploy/ offline: `make deploy-check` (also run by .ci/run).

1. hadolint on the Dockerfile;
2. the kustomize base and every overlay rendered (`kubectl kustomize`, or a `kustomize` binary);
3. built-in kinds validated with `kubernetes-validate --strict` against a pinned Kubernetes version;
4. ServiceMonitor and ScaledObject validated against the CRD schemas kept in deploy/schemas/, strictly
   (unknown fields are errors, as the API server would prune them silently);
   and the rules of our own below (manifest_problems): KEDA owns the replica count and scales on its own
   namespace's series, without flapping; every container has CPU and memory limits; migrations run with
   a credential the service never sees; every Secret key referenced exists in an overlay; overlays pin
   images by digest;
5. alert rules: `promtool check rules` and `promtool test rules`; every alert has a severity, a summary
   and a description, and a test case in which it fires (alert_problems);
6. the Grafana dashboard: valid JSON, a datasource variable, every query on it, and on the `namespace`
   and `instance` variables, so two deployments are never mixed (dashboard_problems).

Exits non-zero with one line per problem.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import yaml

DEPLOY = Path(__file__).resolve().parent
ROOT = DEPLOY.parent
KUBERNETES_VERSION = "1.31.0"
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobjects.yaml",
}

SEVERITIES = {"critical", "warning", "info"}
#: every agentworker_* selector of a dashboard query carries both; other selectors (kube-state-metrics)
#: carry the namespace one, and the query ties them to a filtered agentworker_* selector
NAMESPACE_MATCHER = 'namespace=~"$namespace"'
INSTANCE_MATCHER = 'instance=~"$instance"'
SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")
AGENTWORKER_NAME = re.compile(r"\bagentworker_[a-z_]+\b(?!\s*\{)")
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")

problems: list[str] = []


def step(name: str) -> None:
    print(f"== {name}", flush=True)


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)


def tool(name: str) -> str:
    """A tool from the virtualenv running this script, else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        problems.append(f"{name} not found: install it (see .ci/run)")
        return name
    return found


def check_dockerfile() -> None:
    step("hadolint Dockerfile")
    proc = run([tool("hadolint"), str(ROOT / "Dockerfile")])
    if proc.returncode != 0:
        problems.append(f"hadolint: {proc.stdout.strip() or proc.stderr.strip()}")


def render(kustomization_dir: Path) -> list[dict[str, Any]]:
    if shutil.which("kubectl"):
        cmd = ["kubectl", "kustomize", str(kustomization_dir)]
    elif shutil.which("kustomize"):
        cmd = ["kustomize", "build", str(kustomization_dir)]
    else:
        problems.append("neither kubectl nor kustomize is installed: cannot render the manifests")
        return []
    proc = run(cmd)
    if proc.returncode != 0:
        problems.append(f"kustomize {kustomization_dir.relative_to(ROOT)}: {proc.stderr.strip()}")
        return []
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def strict(schema: Any) -> Any:
    """Reject unknown fields wherever an object schema lists its properties."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if (schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def crd_schema(file_name: str, version: str) -> dict[str, Any]:
    crd = yaml.safe_load((DEPLOY / "schemas" / file_name).read_text())
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            # apiextensions v1 keeps a schema per version; v1beta1 CRDs have one in spec.validation.
            found = (entry.get("schema") or crd["spec"].get("validation") or {}).get("openAPIV3Schema")
            if found is None:
                break
            schema = copy.deepcopy(found)
            # metadata is the API server's, not described by the CRD.
            schema.setdefault("properties", {})["metadata"] = {"type": "object"}
            return dict(strict(schema))
    raise KeyError(f"{file_name} has no schema for version {version}")


def check_manifests() -> None:
    overlays = sorted(p for p in (DEPLOY / "kubernetes" / "overlays").iterdir() if (p / "kustomization.yaml").exists())
    targets = [DEPLOY / "kubernetes" / "base", *overlays]
    for target in targets:
        name = target.relative_to(ROOT)
        step(f"render and validate {name}")
        docs = render(target)
        if not docs:
            continue
        builtin = [d for d in docs if (d.get("apiVersion"), d.get("kind")) not in CUSTOM_KINDS]
        custom = [d for d in docs if (d.get("apiVersion"), d.get("kind")) in CUSTOM_KINDS]
        kinds = {(d.get("apiVersion"), d.get("kind")) for d in custom}
        if kinds != set(CUSTOM_KINDS):
            problems.append(f"{name}: expected a ServiceMonitor and a ScaledObject, found {sorted(map(str, kinds))}")
        rendered = ROOT / ".deploy-check.yaml"
        rendered.write_text(yaml.safe_dump_all(builtin))
        try:
            proc = run([tool("kubernetes-validate"), "--strict", "--quiet", "-k", KUBERNETES_VERSION, str(rendered)])
        finally:
            rendered.unlink()
        if proc.returncode != 0:
            problems.append(f"kubernetes-validate {name}: {(proc.stdout + proc.stderr).strip()}")
        problems.extend(f"{name}: {problem}"
                        for problem in manifest_problems(docs, overlay=target.parent.name == "overlays"))
        for doc in custom:
            api_version, kind = doc["apiVersion"], doc["kind"]
            schema = crd_schema(CUSTOM_KINDS[(api_version, kind)], api_version.split("/")[1])
            errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
            for error in errors:
                path = ".".join(str(p) for p in error.path) or "(root)"
                problems.append(f"{name}: {kind} {doc['metadata'].get('name')}: {path}: {error.message}")


def _pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{d['kind']} {d['metadata'].get('name')}", d["spec"]["template"]["spec"]) for d in docs
            if d.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job") and "template" in d.get("spec", {})]


def _secret_refs(container: dict[str, Any]) -> list[tuple[str, str, str | None, bool]]:
    """(env name, Secret name, key, optional) of every Secret a container reads."""
    refs = []
    for env in container.get("env", []):
        ref = (env.get("valueFrom") or {}).get("secretKeyRef")
        if ref:
            refs.append((env["name"], ref["name"], ref.get("key"), bool(ref.get("optional"))))
    for source in container.get("envFrom", []):
        if "secretRef" in source:
            ref = source["secretRef"]
            refs.append(("(envFrom)", ref["name"], None, bool(ref.get("optional"))))
    return refs


def manifest_problems(docs: list[dict[str, Any]], *, overlay: bool) -> list[str]:
    """Our own rules over one rendered kustomization (base or overlay)."""
    found: list[str] = []
    by_kind_name = {(d.get("kind"), d["metadata"].get("name")): d for d in docs if d.get("metadata")}
    for doc in docs:
        if doc.get("kind") != "ScaledObject":
            continue
        name = doc["metadata"].get("name")
        spec = doc.get("spec", {})
        ref = spec.get("scaleTargetRef", {})
        target = by_kind_name.get((ref.get("kind", "Deployment"), ref.get("name")))
        if target is None:
            found.append(f"ScaledObject {name}: scales {ref.get('kind', 'Deployment')} {ref.get('name')}, "
                         "which is not rendered")
        elif "replicas" in target.get("spec", {}):
            found.append(f"{target['kind']} {ref.get('name')}: sets replicas, but ScaledObject {name} owns the "
                         "count (every apply would reset what the HPA chose)")
        scale_down = (((spec.get("advanced") or {}).get("horizontalPodAutoscalerConfig") or {})
                      .get("behavior") or {}).get("scaleDown") or {}
        if "stabilizationWindowSeconds" not in scale_down or not scale_down.get("policies"):
            found.append(f"ScaledObject {name}: no advanced.horizontalPodAutoscalerConfig.behavior.scaleDown "
                         "stabilizationWindowSeconds and policies (cooldownPeriod only acts when scaling to zero)")
        namespace = doc["metadata"].get("namespace")
        for trigger in spec.get("triggers", []):
            if trigger.get("type") != "prometheus":
                continue
            query = trigger.get("metadata", {}).get("query", "")
            scoped = re.findall(r'\bnamespace="([^"]*)"', query)
            if not scoped:
                found.append(f"ScaledObject {name}: the Prometheus query is not scoped to a namespace: {query}")
            elif namespace is not None and set(scoped) != {namespace}:
                found.append(f"ScaledObject {name}: the Prometheus query selects namespace {sorted(set(scoped))}, "
                             f"the ScaledObject is in {namespace!r}: {query}")
    secrets = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "Secret"}
    for where, pod in _pod_specs(docs):
        containers = pod.get("containers", [])
        init_containers = pod.get("initContainers", [])
        for container in [*init_containers, *containers]:
            limits = (container.get("resources") or {}).get("limits") or {}
            missing = sorted({"cpu", "memory"} - set(limits))
            if missing:
                found.append(f"{where}: container {container['name']} has no {' and no '.join(missing)} limit")
            image = container.get("image", "")
            if overlay and not DIGEST.search(image):
                found.append(f"{where}: container {container['name']}: image {image} is not pinned by digest "
                             "(kustomize images: digest:)")
            for env_name, secret, key, optional in _secret_refs(container):
                if not overlay or optional:
                    continue
                if secret not in secrets:
                    found.append(f"{where}: container {container['name']} reads Secret {secret}, not in the overlay")
                elif key is not None and key not in {**secrets[secret].get("data", {}),
                                                     **secrets[secret].get("stringData", {})}:
                    found.append(f"{where}: container {container['name']} reads key {key} of Secret {secret} "
                                 f"({env_name}), which the overlay's Secret does not have")
        migrators = [c for c in init_containers if c.get("args", [None])[:1] == ["migrate"]]
        service_secrets = {secret for c in containers for _, secret, _, _ in _secret_refs(c)}
        service_secrets |= {v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
        for migrator in migrators:
            urls = [(secret, key) for env_name, secret, key, _ in _secret_refs(migrator)
                    if env_name == "AGENTWORKER_DATABASE_URL"]
            if not urls:
                found.append(f"{where}: init container {migrator['name']} takes AGENTWORKER_DATABASE_URL from no "
                             "Secret")
            for secret, _key in urls:
                if secret in service_secrets:
                    found.append(f"{where}: init container {migrator['name']} migrates with Secret {secret}, which "
                                 "the service's containers can read too: give migrations their own Secret")
    return found


def alert_problems(rules: dict[str, Any], tests: dict[str, Any]) -> list[str]:
    """Every alert is actionable (severity, summary, description) and has a test case in which it fires."""
    found: list[str] = []
    firing = {case.get("alertname") for test in tests.get("tests", []) for case in test.get("alert_rule_test", [])
              if case.get("exp_alerts")}
    for group in rules.get("groups", []):
        for rule in group.get("rules", []):
            alert = rule.get("alert")
            if alert is None:
                continue
            severity = (rule.get("labels") or {}).get("severity")
            if severity not in SEVERITIES:
                found.append(f"alert {alert}: severity {severity!r} is not one of {sorted(SEVERITIES)}")
            for annotation in ("summary", "description"):
                if not (rule.get("annotations") or {}).get(annotation):
                    found.append(f"alert {alert}: no {annotation} annotation")
            if alert not in firing:
                found.append(f"alert {alert}: no case of alerts.test.yaml expects it to fire")
    return found


def query_problems(where: str, expr: str) -> list[str]:
    """A dashboard query that could mix deployments: a selector without the namespace/instance filter."""
    found: list[str] = []
    bare = sorted(set(AGENTWORKER_NAME.findall(expr)))
    if bare:
        found.append(f"{where}: {', '.join(bare)} without a {{{NAMESPACE_MATCHER}, {INSTANCE_MATCHER}}} filter")
    selectors = SELECTOR.findall(expr)
    if not bare and not any(name.startswith("agentworker_") for name, _ in selectors):
        found.append(f"{where}: queries no agentworker_* series, so the instance filter cannot apply: {expr}")
    for name, matchers in selectors:
        needed = [NAMESPACE_MATCHER, INSTANCE_MATCHER] if name.startswith("agentworker_") else [NAMESPACE_MATCHER]
        missing = [m for m in needed if m not in matchers]
        if missing:
            found.append(f"{where}: {name}{{{matchers}}} lacks {' and '.join(missing)}")
    return found


def _variable_query(variable: dict[str, Any]) -> str:
    query = variable.get("query")
    return str(query.get("query", "")) if isinstance(query, dict) else str(query)


def dashboard_problems(dashboard: dict[str, Any]) -> list[str]:
    found: list[str] = []
    variables = {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}
    if variables.get("datasource", {}).get("type") != "datasource":
        found.append("no 'datasource' variable of type datasource")
    namespace, instance = variables.get("namespace"), variables.get("instance")
    if namespace is None or namespace.get("type") != "query":
        found.append("no 'namespace' query variable")
    elif namespace.get("multi") or namespace.get("includeAll"):
        found.append("the 'namespace' variable allows several namespaces at once: deployments would be mixed")
    if instance is None or instance.get("type") != "query":
        found.append("no 'instance' query variable")
    elif NAMESPACE_MATCHER not in _variable_query(instance):
        found.append("the 'instance' variable does not list the instances of $namespace only")
    for name, variable in variables.items():
        if variable.get("type") != "query" or name in ("namespace", "instance"):
            continue
        found.extend(query_problems(f"variable {name!r}", _variable_query(variable)))
    for panel in dashboard.get("panels", []):
        for target in panel.get("targets", []):
            title = panel.get("title")
            if target.get("datasource", {}).get("uid") != "${datasource}":
                found.append(f"panel {title!r} does not query ${{datasource}}")
            if not target.get("expr"):
                found.append(f"panel {title!r} has an empty query")
                continue
            found.extend(query_problems(f"panel {title!r}", target["expr"]))
    return found


def check_alerts() -> None:
    step("promtool check rules / test rules")
    promtool = shutil.which("promtool")
    if promtool is None:
        problems.append("promtool not found: install Debian's 'prometheus' package (see .ci/run)")
        return
    rules = DEPLOY / "prometheus"
    problems.extend(alert_problems(yaml.safe_load((rules / "alerts.yaml").read_text()),
                                   yaml.safe_load((rules / "alerts.test.yaml").read_text())))
    for cmd in (["check", "rules", "alerts.yaml"], ["test", "rules", "alerts.test.yaml"]):
        proc = run([promtool, *cmd], cwd=rules)
        if proc.returncode != 0:
            problems.append(f"promtool {' '.join(cmd)}: {(proc.stdout + proc.stderr).strip()}")


def check_dashboard() -> None:
    step("grafana dashboard")
    path = DEPLOY / "grafana" / "agentworker-dashboard.json"
    try:
        dashboard = json.loads(path.read_text())
    except ValueError as exc:
        problems.append(f"{path.name}: not valid JSON: {exc}")
        return
    problems.extend(f"{path.name}: {problem}" for problem in dashboard_problems(dashboard))


def main() -> int:
    check_dockerfile()
    check_manifests()
    check_alerts()
    check_dashboard()
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    print("deploy check: " + ("OK" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
