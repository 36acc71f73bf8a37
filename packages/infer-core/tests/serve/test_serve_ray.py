"""``infer serve`` on Ray Serve: two fake-backend replicas behind the ingress, driven by the openai client.

One local Ray instance serves the whole session (its start-up is the slow part); the tests
share one application and run in file order: the last ones kill a replica and delete the
application. Skipped without the ``ray`` extra.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

with warnings.catch_warnings():
    # Ray's pydantic models use Field keywords pydantic 2 deprecates; warnings are errors here.
    warnings.simplefilter("ignore", DeprecationWarning)
    ray = pytest.importorskip("ray", reason="needs the ray extra: pip install 'infer-core[ray]'")
    openai = pytest.importorskip("openai")
    httpx = pytest.importorskip("httpx2", reason="installed with openai")
    from ray import serve

    import infer
    from infer.errors import InvalidParameterError
    from infer.serve.ray import APP_NAME, REPLICA_HEADER, RayServeArgs, build_app
    from infer.serve.routing import prefix_key

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(600),
    # Ray's own modules warn about their internals (pydantic, asyncio policies) on import.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]

ROOT = Path(__file__).resolve().parents[4]
#: Seconds the fake backend sleeps per step: streams last long enough to be caught mid-flight.
STEP_LATENCY = 0.01
APP_ARGS: dict[str, Any] = {
    "model": "fake",
    "backend": "fake",
    "options": {"latency": STEP_LATENCY},
    "replicas": 2,
    # Two cores shared with other work: the replicas reserve little, so the cluster fits.
    "num_cpus": 0.25,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def ray_serve() -> Iterator[str]:
    """A local Ray instance with Serve's proxy on a free port; its base URL."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def served(ray_serve: str) -> str:
    """The application with two fake replicas, deployed once; its base URL."""
    serve.run(build_app(APP_ARGS), name=APP_NAME, route_prefix="/")
    return ray_serve


@pytest.fixture
def client(served: str) -> Iterator[Any]:
    with openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def _chat(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def _solo_text(messages: list[dict[str, str]], **params: Any) -> str:
    """What one fake model, alone in this process, answers through the chat template."""
    with infer.load("fake", backend="fake") as model:
        return model.generate(messages=messages, **params).text


# -- building the application ----------------------------------------------------------------


def test_builder_refuses_an_unknown_argument_by_name() -> None:
    with pytest.raises(InvalidParameterError) as caught:
        build_app({"model": "fake", "replica": 2})
    assert "replica" in str(caught.value)


def test_builder_refuses_fixed_and_autoscaled_replica_counts_together() -> None:
    with pytest.raises(InvalidParameterError, match="replicas"):
        RayServeArgs.parse({"model": "fake", "replicas": 2, "max_replicas": 4})


def test_autoscaling_arguments_become_ray_autoscaling_config() -> None:
    args = RayServeArgs.parse(
        {"model": "fake", "min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8, "num_gpus": 1}
    )
    options = args.replica_options()
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}
    assert "num_replicas" not in options
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1}
    assert options["request_router_config"]["request_router_class"].endswith("PrefixAffinityRouter")


def test_every_turn_of_a_conversation_has_its_first_turns_key() -> None:
    system = {"role": "system", "content": "be brief"}
    turn1 = [system, {"role": "user", "content": "hello"}]
    turn3 = [*turn1, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "and then?"}]
    other = [system, {"role": "user", "content": "goodbye"}]
    key = prefix_key(json_body(model="m", messages=turn1))
    assert key is not None
    assert prefix_key(json_body(model="m", messages=turn3)) == key
    assert prefix_key(json_body(model="m", messages=other)) != key
    assert prefix_key(json_body(model="other", messages=turn1)) != key
    assert prefix_key(b"not json") is None


def test_a_prompt_cache_key_keys_requests_together_whatever_their_openings() -> None:
    a = prefix_key(json_body(model="m", prompt="first text", prompt_cache_key="tenant-7"))
    b = prefix_key(json_body(model="m", messages=[{"role": "user", "content": "other"}], prompt_cache_key="tenant-7"))
    assert a is not None and a == b
    assert prefix_key(json_body(model="m", prompt="first text", prompt_cache_key="tenant-8")) != a
    assert prefix_key(json_body(model="m", prompt="first text")) != a  # without the hint: keyed by the prompt
    assert prefix_key(json_body(model="m", prompt="first text", prompt_cache_key="")) == prefix_key(
        json_body(model="m", prompt="first text")
    )


def json_body(**fields: Any) -> bytes:
    import json

    return json.dumps(fields).encode()


def test_infer_and_serve_help_import_nothing_from_ray() -> None:
    code = (
        "import contextlib, io, sys, infer\n"
        "from infer.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['serve', '--help'])\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith(('ray.', 'infer.serve.ray'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_serve_flags_become_the_builders_arguments() -> None:
    from infer.cli.main import build_parser
    from infer.serve.cli import _app_options, _on_ray
    from infer.serve.ray_cli import ray_args

    line = (
        "serve fake --backend fake -o latency=0.5 --min-replicas 1 --max-replicas 3 --num-gpus 1 --max-concurrency 4"
        " --prefix-cache-mib 64 --speculative ngram"
    )
    args = build_parser().parse_args(line.split())
    assert _on_ray(args)
    parsed = RayServeArgs.parse(ray_args(args, _app_options(args, ["*"])))
    # Load options and the KV-reuse flags reach every replica's infer.load.
    assert parsed.options == {"latency": 0.5, "prefix_cache": 64 * 2**20, "speculative": "ngram"}
    assert parsed.app["max_concurrency"] == 4
    options = parsed.replica_options()
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4}
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert not _on_ray(build_parser().parse_args(["serve", "fake"]))  # plain infer serve stays on uvicorn


def _router(imbalanced_threshold: int = 8) -> Any:
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID

    from infer.serve.routing import PrefixAffinityRouter

    deployment = DeploymentID(name="InferReplica", app_name="t")
    # As Ray builds it for a handle: the queue lengths probed from replicas are cached.
    router = PrefixAffinityRouter(deployment, DeploymentHandleSource.UNKNOWN, use_replica_queue_len_cache=True)
    router.initialize_state(imbalanced_threshold=imbalanced_threshold)
    return router


def _replicas(*names: str) -> list[Any]:
    from types import SimpleNamespace

    from ray.serve._private.common import DeploymentID, ReplicaID

    deployment = DeploymentID(name="InferReplica", app_name="t")
    return [SimpleNamespace(replica_id=ReplicaID(unique_id=n, deployment_id=deployment)) for n in names]


def _pending(key: str | None) -> Any:
    from types import SimpleNamespace

    from infer.serve.routing import ForwardedRequest

    return SimpleNamespace(args=[ForwardedRequest({}, b"", True, key)], kwargs={})


def test_router_ranks_the_keys_replica_first_whatever_the_candidates_order() -> None:
    router, replicas = _router(), _replicas("a", "b", "c", "d")
    homes = set()
    for key in (f"conversation-{i}" for i in range(40)):
        ranks = asyncio.run(router.choose_replicas(replicas, _pending(key)))
        again = asyncio.run(router.choose_replicas(replicas[::-1], _pending(key)))
        assert len(ranks[0]) == 1 and ranks[0] == ranks[1] == again[0]
        assert sorted(r.replica_id.unique_id for r in ranks[-1]) == sorted(
            r.replica_id.unique_id for r in replicas if r is not ranks[0][0]
        )
        homes.add(ranks[0][0].replica_id.unique_id)
        # Removing another replica leaves the key where it was (rendezvous hashing).
        others = [r for r in replicas if r is not ranks[0][0]]
        fewer = [ranks[0][0], *others[1:]]
        assert asyncio.run(router.choose_replicas(fewer, _pending(key)))[0] == ranks[0]
    assert homes == {"a", "b", "c", "d"}  # keys spread over every replica


def test_router_goes_least_loaded_without_a_key_or_past_the_imbalance() -> None:
    router, replicas = _router(imbalanced_threshold=2), _replicas("a", "b")
    assert asyncio.run(router.choose_replicas(replicas, _pending(None))) == [replicas]
    first = asyncio.run(router.choose_replicas(replicas, _pending("k")))[0][0]
    other = next(r for r in replicas if r is not first)
    router.on_new_queue_len_info(first.replica_id, 4)
    router.on_new_queue_len_info(other.replica_id, 2)
    assert asyncio.run(router.choose_replicas(replicas, _pending("k")))[0] == [first]  # 2 more: within the threshold
    router.on_new_queue_len_info(other.replica_id, 1)
    assert asyncio.run(router.choose_replicas(replicas, _pending("k"))) == [replicas]  # 3 more: least-loaded


@pytest.mark.parametrize("name", ["ray-serve.yaml", "kuberay-rayservice.yaml"])
def test_deploy_configs_are_valid_serve_configs_naming_the_builder(name: str) -> None:
    import importlib

    import yaml
    from ray.serve.schema import ServeDeploySchema

    document = yaml.safe_load((ROOT / "deploy" / name).read_text())
    if document.get("kind") == "RayService":
        assert document["apiVersion"] == "ray.io/v1"
        assert {"headGroupSpec", "workerGroupSpecs"} <= set(document["spec"]["rayClusterConfig"])
        document = yaml.safe_load(document["spec"]["serveConfigV2"])
    config = ServeDeploySchema.model_validate(document)
    assert config.applications
    for application in config.applications:
        module, _, attribute = application.import_path.partition(":")
        assert getattr(importlib.import_module(module), attribute) is build_app
        assert isinstance(build_app(application.args), serve.Application)  # its arguments are valid
        assert {d.name for d in application.deployments} <= {"InferIngress", "InferReplica"}


# -- serving ----------------------------------------------------------------------------------


def test_chat_through_two_replicas_answers_as_one_model_does(client: Any) -> None:
    messages = _chat("hello there")
    raw = client.chat.completions.with_raw_response.create(
        model="fake", messages=messages, max_tokens=10, seed=3, temperature=0.7
    )
    answer = raw.parse()
    assert raw.headers[REPLICA_HEADER]
    assert answer.choices[0].message.content == _solo_text(messages, max_tokens=10, seed=3, temperature=0.7)
    assert answer.usage.completion_tokens == 10


def test_streamed_completion_equals_the_whole_one(client: Any) -> None:
    whole = client.completions.create(model="fake", prompt="once upon", max_tokens=12, seed=5)
    parts = [
        chunk.choices[0].text
        for chunk in client.completions.create(model="fake", prompt="once upon", max_tokens=12, seed=5, stream=True)
        if chunk.choices
    ]
    assert "".join(parts) == whole.choices[0].text


def test_errors_keep_infer_serves_status_and_body(client: Any, served: str) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="nope", messages=_chat("hi"))
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="fake", messages=_chat("hi"), max_tokens=-1)
    assert bad.value.body["param"] == "max_tokens"
    refused = httpx.post(f"{served}/v1/completions", content=b"prompt=hi", headers={"content-type": "text/plain"})
    assert refused.status_code == 415
    assert refused.json()["error"]["code"] == "unsupported_media_type"


def test_health_reaches_a_replica_and_names_it(served: str) -> None:
    answer = httpx.get(f"{served}/health")
    assert answer.status_code == 200
    assert answer.json()["backend"] == "fake"
    assert answer.headers[REPLICA_HEADER]


def test_hundred_concurrent_streams_equal_their_solo_runs(served: str) -> None:
    async def run() -> tuple[list[str], list[str], set[str]]:
        async with openai.AsyncOpenAI(base_url=f"{served}/v1", api_key="x", max_retries=0, timeout=120) as c:

            async def one(i: int) -> tuple[str, str]:
                async with c.chat.completions.with_streaming_response.create(
                    model="fake",
                    messages=_chat(f"story number {i}"),
                    max_tokens=8,
                    seed=i,
                    temperature=1.0,
                    stream=True,
                ) as response:
                    replica = response.headers[REPLICA_HEADER]
                    text = "".join(
                        [
                            chunk.choices[0].delta.content or ""
                            async for chunk in await response.parse()
                            if chunk.choices
                        ]
                    )
                return text, replica

            solo = [(await one(i))[0] for i in range(100)]
            together = await asyncio.gather(*(one(i) for i in range(100)))
            return solo, [t for t, _ in together], {r for _, r in together}

    solo, together, replicas = asyncio.run(run())
    assert together == solo
    assert len(replicas) == 2  # the load was shared


def test_turns_of_one_conversation_land_on_one_replica(client: Any) -> None:
    homes: dict[int, set[str]] = {}
    for conversation in range(16):
        messages = [{"role": "system", "content": "terse"}, {"role": "user", "content": f"topic {conversation}"}]
        for _ in range(3):
            raw = client.chat.completions.with_raw_response.create(model="fake", messages=messages, max_tokens=4)
            homes.setdefault(conversation, set()).add(raw.headers[REPLICA_HEADER])
            reply = raw.parse().choices[0].message.content
            messages = [*messages, {"role": "assistant", "content": reply}, {"role": "user", "content": "more"}]
    assert all(len(replicas) == 1 for replicas in homes.values()), homes
    assert len(set().union(*homes.values())) == 2  # conversations spread over both replicas


def _replica_request_counts() -> dict[str, float]:
    """``infer_replica_requests_total`` for /v1/completions 200s by replica label, from Ray's metrics port."""
    import re

    port = ray._private.worker.global_worker.node.metrics_export_port
    counts: dict[str, float] = {}
    wanted = ("ray_infer_replica_requests_total{", 'path="/v1/completions"', 'status="200"')
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        found = re.search(r'replica="([^"]+)"', line)
        if line.startswith(wanted[0]) and all(w in line for w in wanted[1:]) and found:
            counts[found[1]] = counts.get(found[1], 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def test_replicas_export_request_counts_tagged_with_their_id_through_ray(client: Any) -> None:
    before = _replica_request_counts()
    answered = set()
    for i in range(6):
        raw = client.completions.with_raw_response.create(model="fake", prompt=f"count me {i}", max_tokens=2)
        answered.add(raw.headers[REPLICA_HEADER])
    deadline = time.monotonic() + 60  # Ray exports metrics every few seconds
    while True:
        after = _replica_request_counts()
        if sum(after.values()) - sum(before.values()) >= 6 and answered <= set(after):
            break
        assert time.monotonic() < deadline, (before, after, answered)
        time.sleep(1)


def test_client_leaving_mid_stream_takes_its_request_off_the_replica(client: Any, served: str) -> None:
    prompt = {"model": "fake", "prompt": "walk away"}
    stream = client.completions.create(**prompt, max_tokens=3000, stream=True)  # 30 s of steps
    next(iter(stream))
    replica = stream.response.headers[REPLICA_HEADER]
    stream.close()
    # A GET with the same body carries the same prefix key: /health answers from that replica.
    deadline = time.monotonic() + 10
    while True:
        health = httpx.request("GET", f"{served}/health", json=prompt)
        assert health.headers[REPLICA_HEADER] == replica
        if health.json()["active_sequences"] == 0:
            break
        assert time.monotonic() < deadline, "the replica kept generating for a client that left"
        time.sleep(0.2)


# -- failure and shutdown (these change the application: they run last) ------------------------


def _replica_actor(replica_id: str) -> Any:
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].endswith(f"#InferReplica#{replica_id}"):
            return ray.get_actor(actor["name"], namespace=actor["namespace"])
    raise LookupError(f"no actor for replica {replica_id}")


def _running_replicas() -> int:
    status = serve.status().applications[APP_NAME].deployments["InferReplica"]
    return int(status.replica_states.get("RUNNING", 0))


def test_killed_replica_ends_its_streams_with_an_error_and_the_other_keeps_serving(client: Any) -> None:
    # Find a conversation the doomed replica holds, then open two long streams on it.
    first = client.chat.completions.with_raw_response.create(model="fake", messages=_chat("doomed"), max_tokens=1)
    doomed = first.headers[REPLICA_HEADER]
    streams = [
        client.chat.completions.create(model="fake", messages=_chat("doomed"), max_tokens=2000, stream=True)
        for _ in range(2)
    ]
    for stream in streams:
        next(iter(stream))  # mid-generation now
    ray.kill(_replica_actor(doomed))
    for stream in streams:
        with pytest.raises(openai.APIError, match="replica"):
            for _ in stream:
                pass
    # The survivor answers at once, whatever the conversation.
    for i in range(6):
        raw = client.chat.completions.with_raw_response.create(model="fake", messages=_chat(f"after {i}"), max_tokens=4)
        assert raw.headers[REPLICA_HEADER] != doomed
    deadline = time.monotonic() + 120
    while _running_replicas() < 2:  # Ray brings the second replica back
        assert time.monotonic() < deadline, "Ray did not restart the killed replica"
        time.sleep(0.5)
    answer = client.chat.completions.create(model="fake", messages=_chat("doomed"), max_tokens=4)
    assert answer.choices[0].finish_reason == "length"


def test_deleting_the_application_lets_in_flight_streams_finish(client: Any, served: str) -> None:
    request = {"model": "fake", "prompt": "last words", "max_tokens": 60, "seed": 1}
    whole = client.completions.create(**request)
    stream = client.completions.create(**request, stream=True)
    received = [next(iter(stream))]
    deleting = threading.Thread(target=serve.delete, args=(APP_NAME,))
    deleting.start()
    received += list(stream)
    deleting.join(120)
    assert not deleting.is_alive()
    assert "".join(chunk.choices[0].text for chunk in received if chunk.choices) == whole.choices[0].text
    assert received[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert APP_NAME not in serve.status().applications


def test_cli_serves_on_a_running_cluster_and_stops_on_sigterm(ray_serve: str, tmp_path: Path) -> None:
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    address = ray.get_runtime_context().gcs_address
    command = [str(Path(sys.executable).parent / "infer"), "serve", "fake", "--backend", "fake", "--replicas", "1"]
    command += ["--ray-address", address, "--num-cpus", "0.25", "--name", "cli-fake"]
    log = tmp_path / "serve.log"
    with log.open("w") as out:  # a file, not a pipe: Ray's log lines must never block the server
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the application did not come up"
            try:
                if httpx.get(f"{ray_serve}/v1/models", timeout=5).json()["data"][0]["id"] == "cli-fake":
                    break
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(120) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert APP_NAME not in serve.status().applications  # only its application went away
    assert ray.is_initialized()
