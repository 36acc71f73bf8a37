"""Stock clients, unchanged, against ``infer serve`` (a real process, fake backend): openai, LangChain, LiteLLM.

Each client is skipped, with the reason, where it is not installed; CI installs them
(``pip install openai langchain-openai litellm``: seconds, from wheels).
"""

from __future__ import annotations

import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra")
from serve_support import ServerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MESSAGES = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--alias", "gpt-4o-mini") as running:
        yield running


def test_openai_client_gets_the_request_id_the_server_sends(server):
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
        reply = client.chat.completions.create(model="fake", messages=MESSAGES, max_tokens=4)
        raw = client.chat.completions.with_raw_response.create(
            model="fake", messages=MESSAGES, max_tokens=4, extra_headers={"x-request-id": "mine-1"}
        )
    assert reply._request_id and reply._request_id.startswith("req_")
    assert raw.request_id == "mine-1"


def test_langchain_chat_model_invokes_streams_and_parses_structured_output(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    pydantic = pytest.importorskip("pydantic")
    chat = langchain_openai.ChatOpenAI(
        base_url=server.url + "/v1", api_key="x", model="gpt-4o-mini", max_tokens=8, temperature=0, max_retries=0
    )
    whole = chat.invoke("hi")
    assert isinstance(whole.content, str) and whole.content
    assert "".join(chunk.content for chunk in chat.stream("hi")) == whole.content
    pytest.importorskip("llguidance", reason="structured output needs llguidance")

    class Flag(pydantic.BaseModel):
        ok: bool

    flagged = langchain_openai.ChatOpenAI(
        base_url=server.url + "/v1", api_key="x", model="fake", max_tokens=20, max_retries=0
    ).with_structured_output(Flag, method="json_schema")
    assert isinstance(flagged.invoke("ok?"), Flag)


def test_langchain_completion_model_batches_prompts_in_one_request(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.OpenAI(
        base_url=server.url + "/v1", api_key="x", model="fake", max_tokens=5, temperature=0, max_retries=0
    )
    answers = llm.batch(["Once", "Twice", "Thrice"])
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert answers[0] == llm.invoke("Once")


# LiteLLM's own import warns about its TypedDicts (pydantic's ReadOnly notice): not ours to fix.
@pytest.mark.filterwarnings("ignore:.*using the `ReadOnly` qualifier:UserWarning")
def test_litellm_completion_whole_and_streamed(server, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch of its price list
    litellm = pytest.importorskip("litellm")
    options = {"model": "openai/fake", "api_base": server.url + "/v1", "api_key": "x", "max_tokens": 6, "seed": 2}
    whole = litellm.completion(messages=MESSAGES, **options)
    streamed = litellm.completion(messages=MESSAGES, stream=True, **options)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed)
    assert text == whole.choices[0].message.content
    assert whole.usage.completion_tokens >= 1
