"""Schemathesis drives ``infer serve`` (fake backend) from OpenAI's own OpenAPI document.

The document is OpenAI's published one trimmed to the operations the server serves
(``tests/openapi/``; ``tools/trim_openai_openapi.py`` made it, ``SOURCE.md`` names the commit).
Every generated request, valid or not, must get an answer that is not a 5xx; every answer must
match the response schema and content type OpenAI documents for it; an operation must refuse
a request without the right key. Checks left out, and why:

* ``status_code_conformance``: OpenAI documents only 200 (and 429 on some operations), so every
  4xx this server rightly sends (401, 404 for an unknown model, 400 for a bad value) counts as
  "undocumented";
* ``positive_data_acceptance``: the schemas admit what a local server does not serve (hosted
  tools, audio, files, other models' names) and answers with a typed 400 or 404;
* ``negative_data_rejection``: the server is lenient on purpose where OpenAI's clients differ
  (integral floats, explicit nulls, unknown fields are warned about, not refused).

Bounded: a fixed number of examples per operation, seeded, under pytest's timeout.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("schemathesis", reason="the OpenAPI check needs schemathesis (tox env clients)")
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    ignored_auth,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
)
from serve_support import REPO, ServerProcess

pytestmark = [pytest.mark.conformance, pytest.mark.slow]

DOCUMENT = REPO / "tests" / "openapi" / "openai-served.json"
KEY = "schemathesis-key"
#: Generated requests per operation (seeded): the run takes about two minutes on a loaded two-core machine.
EXAMPLES = 40
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance, response_headers_conformance]

schema = schemathesis.openapi.from_path(DOCUMENT)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    """``infer serve`` on the fake backend, behind an API key, answering whatever model name is sent.

    Generated requests name OpenAI's models: with only its own name the server would answer
    nearly all of them 404, and the generation paths (streams included) would go unchecked.
    """
    with ServerProcess("--api-key", KEY, "--any-model-name") as proc:
        yield proc


def test_the_vendored_document_holds_exactly_the_served_operations():
    served = {(op.method.upper(), op.path) for op in (r.ok() for r in schema.get_all_operations())}
    assert served == {
        ("POST", "/chat/completions"),
        ("POST", "/completions"),
        ("GET", "/models"),
        ("GET", "/models/{model}"),
        ("POST", "/responses"),
    }


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
)
def test_openai_documented_requests_get_no_5xx_and_responses_match_openai_schemas(case, server):
    checks = [*CHECKS, ignored_auth]
    if isinstance(case.body, dict) and case.body.get("stream") is True:
        # Schemathesis reads a text/event-stream ``schema`` as describing each event's envelope
        # ({"event", "data"}), while OpenAI's document gives the schema of each event's JSON data;
        # every stream would fail. The data are checked against OpenAI's schemas by
        # test_serve_responses and test_serve_openai_shapes instead.
        checks.remove(response_schema_conformance)
    case.call_and_validate(base_url=f"{server.url}/v1", headers={"Authorization": f"Bearer {KEY}"}, checks=checks)
