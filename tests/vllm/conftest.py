"""Tests of the real vLLM engine: they run in the vLLM environment (``bash scripts/setup.sh --vllm``, then
``.venv-vllm/bin/pytest -m vllm tests/vllm``) and are collected, and skipped, by the main environment's pytest.

``HERL_REQUIRE_VLLM=1`` (set by .ci/run) turns every skip in this folder into a failure: in CI these tests must run.
Shared fixtures: the embedded SmolLM2 (fp32, loaded once) and one ``VLLMEngine`` over it per session (an engine
start costs tens of seconds on a CPU).
"""

from __future__ import annotations

import importlib.util
import os

import pytest

VLLM = importlib.util.find_spec("vllm") is not None
REQUIRED = os.environ.get("HERL_REQUIRE_VLLM") == "1"
HERE = os.path.dirname(__file__)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not str(item.fspath).startswith(HERE):
            continue
        item.add_marker(pytest.mark.vllm)
        if not VLLM:
            item.add_marker(pytest.mark.skip(reason="needs vLLM: run in .venv-vllm (bash scripts/setup.sh --vllm)"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRED and report.skipped and str(item.fspath).startswith(HERE):
        report.outcome = "failed"
        report.longrepr = f"HERL_REQUIRE_VLLM=1: a vLLM test must run, not skip ({report.longrepr})"


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer): the embedded SmolLM2-135M-Instruct, fp32, on the CPU."""
    from herl_core.config import ModelConfig
    from herl_core.models import load_policy

    return load_policy(ModelConfig(name_or_path="smollm2-135m-instruct", device="cpu"))


@pytest.fixture(scope="session")
def engine(smollm2):
    """One vLLM engine over SmolLM2 for the session; a test that changes ``engine.model`` puts it back."""
    from herl_core.rollout.vllm import VLLMEngine

    model, tok = smollm2
    eng = VLLMEngine(model, tok, seed=0, kv_cache_gb=1.0)
    yield eng
    eng.close()
