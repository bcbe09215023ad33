"""Test-wide environment: offline, no writes to $HOME, quiet tools. Area fixtures live in tests/<area>/conftest.py."""

from __future__ import annotations

import os
import tempfile

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
