"""Fixtures of the server tests: fake models, the app in process, an HTTP client on it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

import infer


@pytest.fixture
def anyio_backend() -> str:
    """The app runs on asyncio under uvicorn; test it there."""
    return "asyncio"


@pytest.fixture
def make_model() -> Iterator[Callable[..., infer.Model]]:
    """Load fake models with the given backend options; all closed after the test."""
    models: list[infer.Model] = []

    def make(**options: Any) -> infer.Model:
        model = infer.load("fake", backend="fake", **options)
        models.append(model)
        return model

    yield make
    for model in models:
        model.close()


@pytest.fixture
def fake_model(make_model: Callable[..., infer.Model]) -> infer.Model:
    """A fake-backend model with no injected latency or faults."""
    return make_model()


@pytest.fixture
async def client_for() -> AsyncIterator[Callable[..., Any]]:
    """``client_for(model, **create_app_options)``: an async HTTP client talking to the app in process."""
    from serve_support import httpx

    from infer.serve import create_app

    clients: list[Any] = []

    def make(model: infer.Model, **options: Any) -> Any:
        options.setdefault("model_name", "fake")
        app = create_app(model, **options)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost", timeout=30)
        client.app = app
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture
async def client(client_for: Callable[..., Any], fake_model: infer.Model) -> Any:
    """A client of an app serving the plain fake model as ``"fake"``."""
    return client_for(fake_model)
