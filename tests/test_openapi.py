"""``/openapi.json``: a valid OpenAPI 3.1 document that lists exactly the routes the app serves, and whose
schemas the real supervisor's documents (health+json, status, tenant views) satisfy."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from openapi_spec_validator import validate

from agentworker import __version__
from agentworker.health.app import create_app
from agentworker.health.checks import PASS, Check, health_document
from agentworker.health.openapi import openapi_document
from tests.supervisor_helpers import SupervisorProcess, supervisor_factory

METHODS = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}


class _Backend:
    admin_token: str | None = None
    status_token: str | None = None

    def liveness_checks(self) -> list[Check]:
        return [Check("loop:turning", PASS)]


def served_routes() -> set[tuple[str, str]]:
    """(method, path) of every route create_app registers; aiohttp's automatic HEAD of a GET left out."""
    app = create_app(_Backend())  # type: ignore[arg-type]  # routes only: no handler runs
    routes = set()
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter") or info.get("prefix")
        assert path, f"a route without a path: {route!r}"
        routes.add((route.method.lower(), str(path)))
    return routes


def described_routes(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method, path) for path, item in document["paths"].items() for method in item if method in METHODS}


def test_the_document_is_valid_openapi_3_1() -> None:
    document = openapi_document()
    assert document["openapi"].startswith("3.1")
    validate(document)  # raises OpenAPIValidationError with the first problem


def test_the_document_lists_exactly_the_routes_served() -> None:
    served, described = served_routes(), described_routes(openapi_document())
    assert served - described == set(), "routes served but not described in agentworker/health/openapi.py"
    assert described - served == set(), "routes described in agentworker/health/openapi.py but not served"


def test_every_operation_has_an_id_and_responses() -> None:
    ids = []
    for path, item in openapi_document()["paths"].items():
        for method, operation in item.items():
            assert operation["responses"], f"{method} {path} has no responses"
            ids.append(operation["operationId"])
    assert len(ids) == len(set(ids)), "operationIds must be unique"


def _schema(document: dict[str, Any], name: str) -> dict[str, Any]:
    """A component schema with its references resolvable (jsonschema, draft 2020-12 as OpenAPI 3.1 is)."""
    return {"$ref": f"#/components/schemas/{name}", "components": document["components"]}


def check_shape(document: dict[str, Any], name: str, instance: Any) -> None:
    jsonschema.Draft202012Validator(_schema(document, name)).validate(instance)


def test_health_documents_carry_version_release_and_service_ids() -> None:
    document = health_document([Check("redis:ping", PASS)], "probe")
    assert document["releaseId"] == __version__
    assert document["version"] == __version__.split(".")[0]
    assert document["serviceId"].startswith("agentworker-supervisor/")
    assert health_document([], "x", service="webhooks")["serviceId"].startswith("agentworker-webhooks/")
    check_shape(openapi_document(), "HealthDocument", document)


@pytest.fixture
def supervisors(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., SupervisorProcess]]:
    yield from supervisor_factory(redis_url, tmp_path)


@pytest.mark.slow
async def test_a_real_supervisor_serves_the_document_and_its_answers_fit_it(
        quota_file: Path, supervisors: Callable[..., SupervisorProcess]) -> None:
    sup = supervisors(quota_file)
    await sup.wait_ready()
    code, served = await sup.get_json("/openapi.json")
    assert code == 200
    assert served == openapi_document()
    for path in ("/health", "/ready"):
        code, body = await sup.get_json(path)
        assert code == 200, body
        check_shape(served, "HealthDocument", body)
        assert body["releaseId"] == __version__
    check_shape(served, "Status", await sup.status())
