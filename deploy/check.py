"""Validate everything under deploy/ offline: `make deploy-check` (also run by .ci/run).

1. hadolint on the Dockerfile;
2. the kustomize base and every overlay rendered (`kubectl kustomize`, or a `kustomize` binary);
3. built-in kinds validated with `kubernetes-validate --strict` against a pinned Kubernetes version;
4. ServiceMonitor and ScaledObject validated against the CRD schemas kept in deploy/schemas/, strictly
   (unknown fields are errors, as the API server would prune them silently);
5. alert rules: `promtool check rules` and `promtool test rules`;
6. the Grafana dashboard: valid JSON, a datasource variable, every query on it.

Exits non-zero with one line per problem.
"""

from __future__ import annotations

import copy
import json
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
        for doc in custom:
            api_version, kind = doc["apiVersion"], doc["kind"]
            schema = crd_schema(CUSTOM_KINDS[(api_version, kind)], api_version.split("/")[1])
            errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
            for error in errors:
                path = ".".join(str(p) for p in error.path) or "(root)"
                problems.append(f"{name}: {kind} {doc['metadata'].get('name')}: {path}: {error.message}")


def check_alerts() -> None:
    step("promtool check rules / test rules")
    promtool = shutil.which("promtool")
    if promtool is None:
        problems.append("promtool not found: install Debian's 'prometheus' package (see .ci/run)")
        return
    rules = DEPLOY / "prometheus"
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
    variables = {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}
    if variables.get("datasource", {}).get("type") != "datasource":
        problems.append(f"{path.name}: no 'datasource' variable of type datasource")
    for panel in dashboard.get("panels", []):
        for target in panel.get("targets", []):
            if target.get("datasource", {}).get("uid") != "${datasource}":
                problems.append(f"{path.name}: panel {panel.get('title')!r} does not query ${{datasource}}")
            if not target.get("expr"):
                problems.append(f"{path.name}: panel {panel.get('title')!r} has an empty query")


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
