"""Property/fuzz test of the JSON API generated from its own OpenAPI document (schemathesis):
no input, valid or not, may produce a server error (5xx). Bounded to a few examples per
operation so that it stays fast on a CPU-only machine."""

from __future__ import annotations

import itertools

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from web_support import web_app, web_data  # noqa: E402,F401

MAX_EXAMPLES = 8


def _as_localhost(app):
    """The app as reached under ``localhost`` (schemathesis' ASGI client sends ``Host: testserver``,
    which the app's Host allow-list refuses)."""

    async def wrapped(scope, receive, send):
        if scope["type"] == "http":
            headers = [(k, v) for k, v in scope["headers"] if k != b"host"] + [(b"host", b"localhost")]
            scope = {**scope, "headers": headers}
        await app(scope, receive, send)

    return wrapped


def test_no_server_errors(web_app) -> None:  # noqa: F811
    """Every operation of the OpenAPI document, with generated valid (positive) and invalid
    (negative) inputs."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", _as_localhost(web_app))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8, [op.label for op in operations]
    tried: list[str] = []
    statuses: list[int] = []
    for op, mode in itertools.product(operations, list(schemathesis.GenerationMode)):

        @given(case=op.as_strategy(mode))
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        def check(case) -> None:
            response = case.call()
            statuses.append(response.status_code)
            case.validate_response(response, checks=[not_a_server_error])
            assert response.status_code < 500, (case.method, case.formatted_path, response.content[:300])
            assert b"Traceback" not in response.content

        try:
            check()
        except Unsatisfiable:  # no parameters to break (e.g. GET /api/health): nothing negative to send
            assert mode == schemathesis.GenerationMode.NEGATIVE, op.label
            continue
        tried.append(f"{op.label} ({mode.value})")
    assert "POST /api/search (negative)" in tried and "POST /api/upload (positive)" in tried
    assert len(statuses) >= 3 * len(tried)
    assert {200, 404, 422} <= set(statuses), sorted(set(statuses))
    print(f"{len(statuses)} calls over {len(tried)} operations; statuses {sorted(set(statuses))}")
