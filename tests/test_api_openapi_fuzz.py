"""The OpenAPI document tells the truth (issue 14.7): a schema-driven fuzzer (schemathesis)
sends a few hundred generated requests, valid and invalid, with an operator token, and every
answer must be documented (status code, headers, body schema) and none a server error.

Bounded and deterministic: a fixed number of examples per operation, derandomized.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.api_helpers import ApiServer, event

EXAMPLES_PER_OPERATION = 30
MODES = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
# Server errors, undocumented status codes, content types, headers, and bodies that break
# their schema. Not whether a request should be accepted: that can depend on the token (an
# operator must name 'customer') and on several parameters at once ('from' before 'to'),
# which a schema cannot say (both are documented as 400).
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    server = ApiServer(tmp_path_factory.mktemp("fuzz")).start()
    server.store.insert_events([event("acme"), event("globex")])
    try:
        yield server
    finally:
        server.stop()


def test_the_document_is_valid_and_says_what_handlers_answer(api: ApiServer) -> None:
    doc = httpx.get(f"{api.url}/openapi.json", timeout=30).json()
    validate(doc)
    messages = doc["paths"]["/v1/messages"]["get"]
    assert "422" not in messages["responses"]
    for code in ("400", "401", "403", "404", "429"):
        ref = messages["responses"][code]["content"]["application/json"]["schema"]["$ref"]
        assert ref == "#/components/schemas/Error"
    [customer] = [p for p in messages["parameters"] if p["name"] == "customer"]
    assert "operator token must name one" in customer["description"]
    # The 400 body is what the handler sends.
    with api.client(api.operator) as c:
        body = c.get("/v1/messages", params={"customer": "acme", "limit": "x"}).json()
    assert set(body) == {"error", "problems"} and body["problems"][0]["param"] == "limit"


def fuzz(operation: APIOperation, base_url: str, headers: dict[str, str]) -> tuple[int, list[str]]:
    """Run one operation's examples; returns how many ran and every problem found."""
    failures: list[str] = []
    cases = 0

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        nonlocal cases
        mode = data.draw(st.sampled_from(MODES))
        case = data.draw(operation.as_strategy(generation_mode=mode))
        cases += 1
        try:
            case.call_and_validate(base_url=base_url, headers=headers, checks=CHECKS)
        except Exception as exc:  # collect every operation's problems, not the first only
            failures.append(f"{operation.label} ({mode.value}): {exc}")

    run()
    return cases, failures


def test_every_answer_is_documented(api: ApiServer) -> None:
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    headers = {"Authorization": f"Bearer {api.operator}"}
    failures: list[str] = []
    cases = 0
    for result in schema.get_all_operations():
        n, problems = fuzz(result.ok(), api.url, headers)
        cases += n
        failures += problems
    assert cases >= 200  # operations without parameters need only one
    assert not failures, "\n\n".join(failures[:10])
