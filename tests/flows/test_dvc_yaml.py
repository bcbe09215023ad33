"""dvc.yaml against the code it runs: each stage's herl_core deps are the import closure of its runner, and its params
are the config sections it reads (in the base and in the active profile). No DVC run here; tests/integration/
test_dvc.py runs the pipeline for real.

Import closure of a stage: the module-level herl_core imports of herl_core/stages.py, the imports inside
``run_<stage>`` and inside the stages.py functions it calls, then, transitively, every herl_core import anywhere in
each imported module (module level or inside a function: a lazily imported module still runs). Importing
``herl_core.a.b`` also runs the package files ``herl_core/__init__.py`` and ``herl_core/a/__init__.py``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from herl_core.config import SECTIONS, STAGE_SECTIONS, Config
from herl_core.resume import TRAIN_SECTIONS
from herl_core.stages import STAGES

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "herl_core"
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))

READS = {stage: list(sections) for stage, sections in STAGE_SECTIONS.items()}
"""The config sections each stage's runner reads (checked against the code by test_reads_matches_the_runners)."""


# --------------------------------------------------------------------------------------------------------------------
# the import closure


def module_file(name: str) -> Path | None:
    """``herl_core.a.b`` → herl_core/a/b.py or herl_core/a/b/__init__.py (None if it is not a herl_core module)."""
    parts = name.split(".")
    if parts[0] != "herl_core":
        return None
    base = ROOT.joinpath(*parts)
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported(nodes: list[ast.AST]) -> set[str]:
    """herl_core modules imported by the import statements anywhere under ``nodes``."""
    names: set[str] = set()
    for node in (n for top in nodes for n in ast.walk(top)):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names if module_file(f"{node.module}.{a.name}")}
    return {n for n in names if module_file(n)}


def with_packages(name: str) -> set[str]:
    """The module and the packages whose ``__init__.py`` importing it runs."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def closure(start: set[str], done: frozenset[str] = frozenset()) -> set[Path]:
    """Files of every herl_core module reachable from ``start`` (see the module doc); modules in ``done`` are
    included but not followed (stages.py: only its runner's share of it is, by ``runner_imports``)."""
    seen: set[str] = set(done)
    todo = [p for name in start for p in with_packages(name)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse(module_file(name).read_text(encoding="utf-8"))
        todo += [p for dep in imported([tree]) for p in with_packages(dep)]
    return {module_file(n) for n in seen}


def runner_imports(stage: str) -> set[str]:
    """herl_core modules stages.py imports for ``run_<stage>``: module level, the runner, the helpers it calls."""
    tree = ast.parse((PACKAGE / "stages.py").read_text(encoding="utf-8"))
    functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    reached, todo = set(), [f"run_{stage}"]
    while todo:
        name = todo.pop()
        if name in reached:
            continue
        reached.add(name)
        called = {n.id for n in ast.walk(functions[name]) if isinstance(n, ast.Name) and n.id in functions}
        todo += sorted(called)
    return imported(top) | imported([functions[n] for n in reached])


def stage_closure(stage: str) -> set[str]:
    """The closure of ``stage`` as repository paths (stages.py itself included)."""
    files = closure(runner_imports(stage) | {"herl_core.stages"}, done=frozenset({"herl_core.stages"}))
    return {p.relative_to(ROOT).as_posix() for p in files}


def listed_code(stage: str) -> set[str]:
    """The herl_core files dvc.yaml lists as deps of ``stage`` (a folder stands for every .py file under it)."""
    files = set()
    for dep in DVC["stages"][stage]["deps"]:
        path = ROOT / dep
        if not dep.startswith("herl_core"):
            continue
        assert path.exists(), f"dvc.yaml {stage}: dep {dep} does not exist"
        found = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        files |= {p.relative_to(ROOT).as_posix() for p in found}
    return files


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_are_the_import_closure_of_the_stage(stage):
    closed, listed = stage_closure(stage), listed_code(stage)
    missing, extra = sorted(closed - listed), sorted(listed - closed)
    assert (missing, extra) == ([], []), (
        f"dvc.yaml stage {stage}: deps miss {missing} (imported, a change would not rerun it) and list {extra} "
        f"(not imported); the closure is {sorted(closed)}"
    )


def test_the_closure_follows_lazy_imports_helpers_and_packages():
    train = stage_closure("train")
    # inside functions: the Ray pool and vLLM engines are imported lazily by make_engine
    assert {"herl_core/rollout/ray_pool.py", "herl_core/rollout/vllm.py"} <= train
    # the trainer's own imports: the update (with the clipping), the data-parallel seam, memory trimming
    assert {"herl_core/update.py", "herl_core/distributed.py", "herl_core/memory.py", "herl_core/resume.py"} <= train
    # a helper of stages.py: load_prompts imports the constraint checkers lazily
    assert "herl_core/rewards/constraints.py" in stage_closure("evaluate")
    # package files run on import
    assert {"herl_core/__init__.py", "herl_core/hindsight/__init__.py"} <= stage_closure("rollout")
    assert "herl_core/train.py" not in stage_closure("prepare")


def test_the_deps_check_fails_on_the_drift_it_was_written_for():
    """The hand lists this test replaced: train missed distributed.py and memory.py, rollout missed
    hindsight/prompt.py; the check sees each of those as missing."""
    assert {"herl_core/distributed.py", "herl_core/memory.py"} <= stage_closure("train")
    assert "herl_core/hindsight/prompt.py" in stage_closure("rollout")
    old_train = {"herl_core/train.py", "herl_core/advantage.py", "herl_core/loss.py", "herl_core/hindsight/step.py"}
    assert "herl_core/distributed.py" not in old_train and "herl_core/distributed.py" in stage_closure("train")


# --------------------------------------------------------------------------------------------------------------------
# params


def test_each_stage_lists_the_sections_it_reads_in_the_base_and_in_the_active_profile():
    for stage in STAGES:
        params = DVC["stages"][stage]["params"]
        expected = ["profile", *READS[stage], *(f"profiles.${{profile}}.{s}" for s in READS[stage])]
        assert params == expected, stage
    assert "probe" not in DVC["stages"]["train"]["params"]  # a probe knob never reruns train


def test_train_lists_the_sections_of_the_fingerprint():
    """The train stage reruns exactly when a section its resume fingerprint hashes changes (herl_core.resume)."""
    assert READS["train"] == list(TRAIN_SECTIONS)
    assert list(STAGE_SECTIONS) == list(STAGES)


def test_reads_matches_the_runners():
    """READS[stage] = the ``cfg.<section>`` the runner (and the stages.py helpers it calls) reads; for train, the
    trainer reads cfg.<section> too (herl_core/train.py)."""
    tree = ast.parse((PACKAGE / "stages.py").read_text(encoding="utf-8"))
    functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}

    def sections(node: ast.AST) -> set[str]:
        return {
            n.attr
            for n in ast.walk(node)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "cfg"
            and n.attr in SECTIONS
        }  # fmt: skip

    for stage in STAGES:
        reached, todo = set(), [f"run_{stage}"]
        while todo:
            name = todo.pop()
            if name not in reached:
                reached.add(name)
                todo += [n.id for n in ast.walk(functions[name]) if isinstance(n, ast.Name) and n.id in functions]
        found = set().union(*(sections(functions[n]) for n in reached))
        if stage == "train":
            found |= {
                n.attr
                for n in ast.walk(ast.parse((PACKAGE / "train.py").read_text(encoding="utf-8")))
                if isinstance(n, ast.Attribute) and n.attr in SECTIONS
                and ((isinstance(n.value, ast.Attribute) and n.value.attr == "cfg")
                     or (isinstance(n.value, ast.Name) and n.value.id == "cfg"))
            }  # fmt: skip
        assert found == set(READS[stage]), stage


def project_profiles() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))["profiles"]


@pytest.mark.parametrize("profile", sorted(project_profiles()))
def test_every_profile_names_every_section_dvc_yaml_tracks(profile):
    """DVC refuses a listed params key that is missing (before running anything): ``profiles.<p>.<section>`` must
    exist for every section any stage lists, ``{}`` when the profile overrides nothing there."""
    tracked = {
        p.split(".", 2)[2] for stage in DVC["stages"].values() for p in stage["params"] if p.startswith("profiles.")
    }
    assert tracked <= set(project_profiles()[profile]), sorted(tracked - set(project_profiles()[profile]))
    assert all(p in Config.model_fields for p in project_profiles()[profile])


def test_profile_interpolation_is_the_only_template_in_params():
    for stage in DVC["stages"].values():
        for param in stage["params"]:
            assert re.fullmatch(r"profile|[a-z_]+|profiles\.\$\{profile\}\.[a-z_]+", param), param


# --------------------------------------------------------------------------------------------------------------------
# the stage command: scripts/herl


def test_stage_command_finds_herl_on_path_else_in_the_clones_venv(tmp_path):
    """dvc.yaml runs ``scripts/herl <stage>``: the ``herl`` on PATH when there is one (an activated environment, or
    the interpreter ``herl pipeline`` runs), else ``<clone>/.venv/bin/herl``, else exit 127 saying what to do."""
    import shutil
    import subprocess

    clone = tmp_path / "clone"
    (clone / "scripts").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "herl", clone / "scripts" / "herl")
    for stage in DVC["stages"].values():
        assert stage["cmd"].startswith("scripts/herl ")

    def fake(folder: Path, says: str) -> None:
        folder.mkdir(parents=True)
        (folder / "herl").write_text(f'#!/bin/sh\necho "{says} $*"\n')
        (folder / "herl").chmod(0o755)

    def run(path: str) -> subprocess.CompletedProcess:
        env = {"PATH": path, "HOME": str(tmp_path)}
        return subprocess.run(["/bin/bash", "scripts/herl", "train", "--profile", "tiny"], cwd=clone, env=env,
                              capture_output=True, text=True)  # fmt: skip

    system = "/usr/bin:/bin"
    missing = run(system)
    assert missing.returncode == 127 and "run 'bash scripts/setup.sh'" in missing.stderr
    fake(clone / ".venv" / "bin", "venv")
    assert run(system).stdout == "venv train --profile tiny\n"  # not activated: the clone's .venv
    fake(tmp_path / "env" / "bin", "path")
    assert run(f"{tmp_path / 'env' / 'bin'}:{system}").stdout == "path train --profile tiny\n"  # activated
