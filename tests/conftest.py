"""Test-wide environment: offline, no writes to $HOME, quiet tools. Area fixtures live in tests/<area>/conftest.py."""

from __future__ import annotations

import os
import tempfile

import pytest

_TMP_HOME = tempfile.mkdtemp(prefix="herl-test-home-")

# Offline and isolated before anything imports transformers / prefect / mlflow.
os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "DVC_NO_ANALYTICS": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "TOKENIZERS_PARALLELISM": "false",
    }
)
os.environ.setdefault("HF_HOME", os.path.join(_TMP_HOME, "hf"))
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(_TMP_HOME, "hf", "datasets"))
os.environ.setdefault("MPLCONFIGDIR", os.path.join(_TMP_HOME, "mpl"))


# --------------------------------------------------------------------------------------------------------------------
# Comparing two computations of the same generations (another batch layout, engine, process or CPU)

DRAW_MARGIN = 1e-3
"""Draws closer than this to choosing another token may flip between two computations (herl_core.compare).
Measured rounding between batch layouts on the tiny test model: log-probs within 6.2e-6 on AVX-512 and on AVX2
(capped with ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA / MKL_ENABLE_INSTRUCTIONS), so 1e-3 leaves a factor > 100."""

LOGPROB_ATOL = 1e-4
"""Log-probs of equal tokens in two computations agree within this (measured: ≤ 6.2e-6, see DRAW_MARGIN)."""


@pytest.fixture
def same_draws():
    """``same_draws(a, b, min_full=0.5)``: assert that two lists of generations are the same call computed two ways,
    as far as float rounding allows (herl_core.compare), and that at least ``min_full`` of the rows were
    compared to their end (so a test cannot pass by cutting every row at a near-tie)."""
    from herl_core.compare import compare_generations

    def check(a, b, *, margin: float = DRAW_MARGIN, logprob_atol: float = LOGPROB_ATOL, min_full: float = 0.5):
        result = compare_generations(a, b, margin=margin, logprob_atol=logprob_atol)
        assert result.ok, "\n".join(result.violations)
        assert result.full_rows >= min_full * result.rows, (
            f"only {result.full_rows} of {result.rows} rows were compared to their end (the others hit a near-tie "
            f"draw): the test compares too little; change its seed or prompts"
        )
        return result

    return check


@pytest.fixture
def draw_margin() -> float:
    """DRAW_MARGIN, for tests that compare records (no token ids) row by row."""
    return DRAW_MARGIN
