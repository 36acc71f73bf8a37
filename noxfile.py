"""Developer automation: wheels, the extras check, benchmarks, fixtures and goldens.

nox -s wheels        build a wheel of every package into dist/wheels
nox -s extras        prove the extras: fresh venv, pip install --find-links dist/wheels 'infer-core[fake]'
nox -s bench         infer bench on the fake and ONNX backends, and the sampler benchmark
nox -s fixtures      regenerate the tiny Llama fixture (deterministic)
nox -s goldens       regenerate golden references with transformers + torch (dev only)
nox -s tests         the test matrix, through tox (the README's command)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nox

ROOT = Path(__file__).parent
WHEELS = ROOT / "dist" / "wheels"
PACKAGES = [
    "packages/infer-core",
    "packages/infer-backend-fake",
    "packages/infer-backend-onnx",
    "packages/infer-backend-coreml",
    "conformance",
]
nox.options.sessions = ["tests"]


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    """Run the CI label of the tox matrix."""
    session.run("tox", "run", "-m", "ci", *session.posargs)


@nox.session
def wheels(session: nox.Session) -> None:
    """Build a wheel of every package into dist/wheels."""
    shutil.rmtree(WHEELS, ignore_errors=True)
    WHEELS.mkdir(parents=True)
    session.install("build")
    for package in PACKAGES:
        if (ROOT / package / "pyproject.toml").is_file():
            session.run("python", "-m", "build", "--wheel", "--outdir", str(WHEELS), package)


@nox.session
def extras(session: nox.Session) -> None:
    """From the wheels alone, `infer-core[fake]` installs the fake backend too, and it runs."""
    wheels(session)
    session.install("--find-links", str(WHEELS), "infer-core[fake]")
    out = session.run("infer", "backends", "--json", silent=True)
    assert out is not None and '"name": "fake"' in out, f"the fake backend is missing: {out}"
    session.run("infer", "run", "fake", "hello", "--backend", "fake", "--max-tokens", "4")
    session.log("infer-core[fake] installed infer-backend-fake from the wheels, and it generates")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks (figures, not tests): the engine on the fake, the sampler, the ONNX backend."""
    packages = ["packages/infer-core", "packages/infer-backend-fake", "packages/infer-backend-onnx"]
    session.install(*(arg for package in packages for arg in ("-e", package)))
    session.run("infer", "bench", "fake", "--backend", "fake", "-o", "vocab_size=49152", "--json", "--runs", "5")
    session.run("python", "benchmarks/bench_sampling.py")
    session.run("python", "benchmarks/bench_engine.py")
    session.run("python", "benchmarks/onnx/run.py", *session.posargs)


@nox.session
def fixtures(session: nox.Session) -> None:
    """Regenerate the tiny Llama fixture from its seed."""
    session.install("-e", "packages/infer-core", "-e", "conformance")
    session.run("python", "tools/make_tiny_fixture.py")


@nox.session
def goldens(session: nox.Session) -> None:
    """Regenerate golden references with transformers + torch (never a project dependency)."""
    session.install("torch==2.13.0", "transformers", "gguf", "-e", "packages/infer-core", "-e", "conformance")
    session.run("python", "tools/py_ref/make_goldens.py", *session.posargs)
