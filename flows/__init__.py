"""The orchestration layer of herl: the ``herl`` CLI, MLflow tracking, Prefect flows, deployment and the study.

Telemetry of the tools we drive is off by default (offline machines, privacy); an explicit setting wins.
"""

import os

for _name, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # else the temporary server logs telemetry errors offline
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",  # inherited by the `dvc repro` subprocesses
}.items():
    os.environ.setdefault(_name, _value)
