"""``infer serve`` wiring: flags reach the app and uvicorn, the model loads as ``infer run`` loads it."""

from __future__ import annotations

import signal

import pytest

from infer.cli import main

pytest.importorskip("starlette", reason="the server needs the serve extra")
uvicorn = pytest.importorskip("uvicorn", reason="the server needs the serve extra")

pytestmark = pytest.mark.unit


@pytest.fixture
def captured(monkeypatch):
    """Replace uvicorn's serving loop: record the config it was given instead of listening."""
    seen = {}

    def fake_run(self, sockets=None):
        seen["config"] = self.config
        seen["model"] = self.config.app.state.server.model
        self.started = True

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    previous = signal.getsignal(signal.SIGTERM)
    yield seen
    signal.signal(signal.SIGTERM, previous)


def test_serve_flags_reach_the_app_and_uvicorn(captured):
    status = main(
        [
            "serve",
            "fake",
            "--backend",
            "fake",
            "-o",
            "latency=0.001",
            "--port",
            "8123",
            "--name",
            "tiny",
            "--api-key",
            "k",
            "--max-concurrency",
            "3",
            "--max-queue",
            "0",
            "--max-prompt-tokens",
            "100",
            "--max-kv-mib",
            "2",
            "--timeout",
            "2.5",
            "--grace",
            "1.5",
        ]
    )
    assert status == 0
    config = captured["config"]
    assert (config.host, config.port, config.timeout_graceful_shutdown) == ("127.0.0.1", 8123, 1.5)
    server = config.app.state.server
    assert server.model_name == "tiny"
    assert (server.admission.max_concurrency, server.admission.max_queue) == (3, 0)
    assert (server.max_prompt_tokens, server.request_timeout) == (100, 2.5)
    assert server.admission.kv_budget_bytes == 2 * 2**20
    assert server.model.handle.options.latency == 0.001  # -o options load the model as `infer run` does
    with pytest.raises(Exception, match="closed"):  # the command closes the model when the server stops
        server.model.generate("x")
    # uvicorn re-raises SIGTERM after draining; the command's handler turns that into a clean exit.
    assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)


def test_the_served_name_defaults_to_the_model_reference(captured):
    assert main(["serve", "fake", "--backend", "fake"]) == 0
    assert captured["config"].app.state.server.model_name == "fake"
    assert captured["config"].port == 8000


@pytest.mark.parametrize(
    "args",
    [
        ["--max-queue", "-1"],
        ["--max-concurrency", "0"],
        ["--timeout", "0"],
        ["--grace", "inf"],
        ["--port", "http"],
    ],
)
def test_bad_serve_flags_exit_2(captured, args, capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "fake", "--backend", "fake", *args])
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err
    assert "config" not in captured


def test_a_bad_backend_option_exits_2_with_its_name(captured, capsys):
    assert main(["serve", "fake", "--backend", "fake", "-o", "nonsense=1"]) == 2
    assert "nonsense" in capsys.readouterr().err


def test_safe_defaults_reach_the_app_and_uvicorn(captured):
    from infer.serve.defaults import DEFAULT_REQUEST_TIMEOUT
    from infer.serve.guards import HeaderTimeoutH11

    assert main(["serve", "fake", "--backend", "fake"]) == 0
    config = captured["config"]
    server = config.app.state.server
    assert server.request_timeout == DEFAULT_REQUEST_TIMEOUT
    assert not server.strict_requests
    assert issubclass(config.http, HeaderTimeoutH11)
    assert config.limit_concurrency == 32 + 256 + 64  # slots + queue + headroom: connections are bounded


def test_hardening_flags_reach_the_app_and_the_protocol(captured):
    args = ["--header-timeout", "3", "--body-timeout", "4", "--write-timeout", "5", "--strict-requests"]
    assert main(["serve", "fake", "--backend", "fake", "--allowed-hosts", "a.example, b.example", *args]) == 0
    config = captured["config"]
    server = config.app.state.server
    assert config.http.header_timeout == 3.0
    assert (server.body_timeout, server.write_timeout, server.strict_requests) == (4.0, 5.0, True)
    host_check = _host_check(config.app)
    assert host_check.kwargs["allowed"] == ("a.example", "b.example")


@pytest.mark.parametrize("key", ["", "  "])
def test_an_empty_api_key_is_refused_at_start(captured, capsys, key):
    assert main(["serve", "fake", "--backend", "fake", "--api-key", key]) == 2
    assert "--api-key is empty" in capsys.readouterr().err
    assert "config" not in captured


def test_the_served_name_of_a_model_path_is_its_last_part_not_the_path(tmp_path):
    from infer.serve.cli import public_model_name

    folder = tmp_path / "secret-home" / "my-model"
    folder.mkdir(parents=True)
    assert public_model_name(str(folder)) == "my-model"
    assert public_model_name(str(folder) + "/") == "my-model"
    assert public_model_name("hf:org/name") == "hf:org/name"  # not a path: kept as given


@pytest.mark.parametrize(
    ("args", "allowed"),
    [
        ([], ("localhost", "127.0.0.1", "::1", "127.0.0.1")),
        (["--host", "10.1.2.3"], ("localhost", "127.0.0.1", "::1", "10.1.2.3")),
        (["--host", "0.0.0.0"], ("localhost", "127.0.0.1", "::1")),  # all interfaces: names must be given
        (["--host", "0.0.0.0", "--allowed-hosts", "*"], ("*",)),
    ],
)
def test_allowed_hosts_default_to_loopback_and_a_specific_listen_address(captured, args, allowed):
    assert main(["serve", "fake", "--backend", "fake", *args]) == 0
    assert _host_check(captured["config"].app).kwargs["allowed"] == allowed


def test_help_with_the_serve_command_registered_imports_no_server_or_numeric_module():
    import subprocess
    import sys

    code = (
        "import sys\nfrom infer.cli import main\ntry:\n    main(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
        "print([m for m in ('numpy', 'starlette', 'uvicorn', 'jinja2', 'infer.serve.app') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--allowed-hosts" in result.stdout and "--header-timeout" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]"


def _host_check(app):
    from infer.serve.guards import HostCheck

    return next(m for m in app.user_middleware if m.cls is HostCheck)


def test_alias_any_model_name_and_cors_flags_reach_the_app(captured):
    args = ["--name", "main", "--alias", "gpt-4o", "--alias", "local", "--any-model-name"]
    args += ["--cors-origins", "http://localhost:3000, https://ui.example"]
    assert main(["serve", "fake", "--backend", "fake", *args]) == 0
    app = captured["config"].app
    server = app.state.server
    assert server.names == ("main", "gpt-4o", "local") and server.any_model_name
    from starlette.middleware.cors import CORSMiddleware

    cors = next(m for m in app.user_middleware if m.cls is CORSMiddleware)
    assert cors.kwargs["allow_origins"] == ["http://localhost:3000", "https://ui.example"]


def test_no_cors_unless_asked(captured):
    assert main(["serve", "fake", "--backend", "fake"]) == 0
    from starlette.middleware.cors import CORSMiddleware

    assert all(m.cls is not CORSMiddleware for m in captured["config"].app.user_middleware)


@pytest.mark.parametrize(
    ("flags", "budget", "speculates"),
    [
        ([], 512 * 2**20, True),  # the defaults: prefix cache on (the fake can fork), speculation auto
        (["--no-prefix-cache", "--speculative", "off"], None, False),
        (["--prefix-cache-mib", "64", "--speculative", "ngram"], 64 * 2**20, True),
    ],
)
def test_kv_reuse_flags_reach_the_model(captured, flags, budget, speculates):
    assert main(["serve", "fake", "--backend", "fake", *flags]) == 0
    model = captured["model"]
    cache = model._engine.prefix_cache
    assert (None if cache is None else cache.budget) == budget
    assert model.speculative is speculates
