"""Developer automation: wheels, the extras check, benchmarks, fixtures and goldens.

nox -s wheels        build a wheel of every package into dist/wheels
nox -s extras        prove the extras: fresh venv, pip install --find-links dist/wheels 'infer-core[fake]'
nox -s bench         infer bench on the fake and ONNX backends, and the sampler benchmark
nox -s fixtures      regenerate the tiny Llama fixture (deterministic)
nox -s goldens       regenerate golden references with transformers + torch (dev only)
nox -s tests         the test matrix, through tox (the README's command)
nox -s stress        the conformance suite 20 runs in a row on fake and onnx (flake hunt; -- BACKEND... to choose)
"""

from __future__ import annotations

import json
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
    "packages/infer-backend-numpy",
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


#: What each extra must bring, as (backend name, whether it must run on Linux).
EXTRAS = {"fake": ("fake", True), "onnx": ("onnx", True), "coreml": ("coreml", False)}


@nox.session
@nox.parametrize("extra", list(EXTRAS))
def extras(session: nox.Session, extra: str) -> None:
    """From the wheels alone, `infer-core[EXTRA]` installs that backend (and its runtime) too."""
    if not any(WHEELS.glob("infer_core-*.whl")):
        wheels(session)
    session.install("--find-links", str(WHEELS), f"infer-core[{extra}]")
    backend, runs_here = EXTRAS[extra]
    out = session.run("infer", "backends", "--json", silent=True)
    assert out is not None, "infer backends printed nothing"
    info = next((b for b in json.loads(out)["backends"] if b["name"] == backend), None)
    assert info is not None, f"infer-core[{extra}] did not install the {backend} backend: {out}"
    if runs_here:
        assert info["available"], f"the {backend} backend should run here: {info}"
    if extra == "fake":
        session.run("infer", "run", "fake", "hello", "--backend", "fake", "--max-tokens", "4", "--raw")
    if extra == "onnx":
        session.run("python", "-c", "import onnxruntime, onnx")
    if extra == "coreml":
        session.run("python", "-c", "import coremltools")
        session.log(f"coreml on this platform: available={info['available']} ({info['unavailable_reason']})")
    session.log(f"infer-core[{extra}] installed the {backend} backend from the wheels")


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


@nox.session
def stress(session: nox.Session) -> None:
    """The whole conformance suite 20 runs in a row per backend: any failure is a flake to fix."""
    backends = session.posargs or ["fake", "onnx"]
    packages = ["packages/infer-core", "packages/infer-backend-fake", "packages/infer-backend-onnx", "conformance"]
    if "numpy" in backends:
        packages.append("packages/infer-backend-numpy")
    session.install("pytest", "pytest-timeout", "hypothesis", *(arg for package in packages for arg in ("-e", package)))
    for backend in backends:
        for run in range(1, 21):
            session.log(f"{backend}: run {run} of 20")
            session.run(
                "pytest", "--pyargs", "infer_conformance", "--infer-backend", backend, "-q", "-p", "no:cacheprovider"
            )
