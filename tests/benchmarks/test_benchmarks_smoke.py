"""Smoke tests of benchmarks/: each script runs end to end on the tiny model with minimal sizes and writes
its JSON. No timing is asserted; only shapes, token counts and recorded context.

Run: .venv/bin/pytest tests/benchmarks -q
Not run here: TRL (its import and trainer setup take longer than the rest together) and pipeline_overhead (four
training subprocesses); peak_memory is checked through its ``measure`` helper on a small child process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # benchmarks/ is a folder of scripts in the repo, not an installed package

from benchmarks import peak_memory, rollout_throughput, step_time  # noqa: E402
from benchmarks.common import table  # noqa: E402


def test_table_formats_rows():
    # two columns, floats below 100 get 3 significant digits, above 100 one decimal
    assert table([{"a": "x", "b": 0.12345}, {"a": "y", "b": 1234.56}], ["a", "b"]).splitlines() == [
        "| a | b |",
        "|---|---|",
        "| x | 0.123 |",
        "| y | 1234.6 |",
    ]


def test_rollout_throughput_tiny(tmp_path):
    rollout_throughput.main(
        ["--models", "tiny", "--batch-sizes", "2", "--new-tokens", "3", "--no-wait", "--out-dir", str(tmp_path)]
    )
    res = json.loads((tmp_path / "rollout_throughput.json").read_text())
    (row,) = res["rows"]
    # forced length: 2 sequences × 3 new tokens = 6 tokens on both sides
    assert row["ours_tokens"] == row["plain_tokens"] == 6
    assert row["ours_tok_s"] > 0 and row["bound_tok_s"] > 0
    by_shape = res["ceilings"]["tiny"]["gflops_by_shape"]
    assert res["ceilings"]["tiny"]["ceiling_gflops"] == max(r for rates in by_shape.values() for r in rates.values())
    assert all("mm" in rates for rates in by_shape.values()) and "1024x1024x1024" in by_shape
    assert res["command"].startswith("python") and "--new-tokens 3" in res["command"]
    assert {"load1_start", "load1_end", "commit", "machine"} <= set(res)


def test_step_time_tiny_without_trl(tmp_path):
    from herl_core.prepare import build_train_set, synthetic_instructions

    data = tmp_path / "train.jsonl"  # its own prompts: the test must not depend on a workspace's `herl prepare`
    rows = build_train_set(synthetic_instructions()[:4], seed=0, min_constraints=1, max_constraints=1)
    data.write_text("".join(r.model_dump_json() + "\n" for r in rows))
    args = ["--model", "tiny", "--profile", "tiny", "--prompts", "1", "--G", "2", "--max-new-tokens", "3"]
    args += ["--data", str(data)]
    step_time.main([*args, "--rewrite-max-new-tokens", "3", "--reps", "1", "--no-trl", "--no-wait",
                    "--out-dir", str(tmp_path)])  # fmt: skip
    res = json.loads((tmp_path / "step_time.json").read_text())
    assert [r["side"] for r in res["rows"]] == ["herl GRPO", "herl HeRL"]
    for side in res["sides"].values():
        assert len(side["step_s"]) == 2  # one warm-up + reps=1 timed step
        assert side["median_s"] == side["step_s"][1]
        assert 1 <= side["completion_len"] <= 3


def test_step_time_vllm_backend_is_refused_without_cuda_or_vllm(tmp_path, monkeypatch):
    import importlib.util

    import pytest
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(SystemExit, match="needs a CUDA GPU and vllm: run it in the GPU environment"):
        step_time.main(["--backend", "vllm", "--no-wait", "--out-dir", str(tmp_path)])
    assert not (tmp_path / "step_time.json").exists()  # refused before anything ran or was written


def test_peak_memory_measure_sees_a_child_allocation():
    # the child holds a 300 MB bytearray for half a second: the sampled and the kernel peak both see ≥ 0.3 GB
    code = "import time; b = bytearray(300_000_000); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.5)"
    res = peak_memory.measure([sys.executable, "-c", code], env={"PATH": "/usr/bin:/bin"}, interval=0.05)
    assert res["peak_rss_gb_sampled"] >= 0.3
    if res["peak_rss_gb_time_v"] is not None:
        assert res["peak_rss_gb_time_v"] >= 0.3


def test_rollout_ab_tiny(tmp_path):
    from benchmarks import rollout_ab

    # base = HEAD's hf.py, loaded through `git show` into its own module; both engines sample 4 rows × 2 forced tokens
    rollout_ab.main(["--model", "tiny", "--base", "HEAD", "--batch", "4", "--calls", "1", "--new-tokens", "2",
                     "--no-wait", "--out-dir", str(tmp_path)])  # fmt: skip
    res = json.loads((tmp_path / "rollout_ab.json").read_text())
    assert [r["engine"] for r in res["rows"]] == ["base", "head"] and res["base"] == "HEAD"
    for row in res["rows"]:
        assert row["tokens_per_call"] == 8 and len(row["tok_s_per_call"]) == 1 and row["median_tok_s"] > 0


def test_suite_commands_and_docs():
    from benchmarks import suite

    names = [name for name, _ in suite.commands(None)]
    assert names == ["rollout_throughput", "step_time", "peak_memory", "pipeline_overhead"]  # no A/B without a base
    name, args = suite.commands("abc123")[1]
    assert name == "rollout_ab" and args[:2] == ["--base", "abc123"]
    doc = (Path(__file__).resolve().parents[2] / "docs" / "performance.md").read_text()
    assert "python -m benchmarks.suite" in doc


def test_suite_refuses_a_dirty_tree_and_stops_at_the_first_failure(tmp_path, monkeypatch, capsys):
    from benchmarks import suite

    monkeypatch.setattr(suite, "git_commit", lambda: {"commit": "f" * 40, "dirty": True})
    with pytest.raises(SystemExit, match="uncommitted changes"):
        suite.main(["--out-dir", str(tmp_path)])
    assert not (tmp_path / "suite.json").exists()
    # `python -m benchmarks.common` exits 0 (no main); a missing module exits 1; the third never runs
    monkeypatch.setattr(suite, "SUITE", [("common", []), ("no_such_benchmark", []), ("common", [])])
    with pytest.raises(SystemExit, match="no_such_benchmark failed"):
        suite.main(["--allow-dirty", "--out-dir", str(tmp_path)])
    res = json.loads((tmp_path / "suite.json").read_text())
    assert [(r["name"], r["rc"] == 0) for r in res["runs"]] == [("common", True), ("no_such_benchmark", False)]
    assert res["dirty"] is True and res["runs"][0]["command"] == "python -m benchmarks.common "


def test_pipeline_overhead_reference_from_a_peak_memory_result(tmp_path):
    from benchmarks.pipeline_overhead import reference_wall

    good = tmp_path / "peak_memory.json"
    good.write_text(json.dumps({"wall_s": 251.5, "profile": "cpu", "steps": 4, "commit": "0123456789abcdef"}))
    wall, source = reference_wall(good)
    assert wall == 251.5 and source == "peak_memory.json: herl train --profile cpu, 4 steps, commit 0123456"
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps({"wall_s": 20.0, "profile": "tiny", "steps": 2}))
    with pytest.raises(SystemExit, match="profile 'tiny'"):
        reference_wall(tiny)
    broken = tmp_path / "broken.json"
    broken.write_text('{"wall_s": 1')
    with pytest.raises(SystemExit, match="broken.json: not a peak_memory result"):
        reference_wall(broken)


def test_git_commit_dirty_ignores_the_results_folder(tmp_path, monkeypatch):
    import subprocess

    from benchmarks import common

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results" / "a.json").write_text("{}\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    monkeypatch.setattr(common, "ROOT", tmp_path)
    (tmp_path / "benchmarks" / "results" / "a.json").write_text('{"rows": []}\n')  # an earlier benchmark's result
    assert common.git_commit()["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert common.git_commit()["dirty"] is True


def test_cpu_info_reads_model_and_isa_flags():
    from benchmarks.common import cpu_info

    text = (
        "processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu sse avx2 fma avx512f avx512_bf16 avx512_vnni\n"
        "processor\t: 1\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu\n"
    )
    info = cpu_info(text)
    assert info["cpu"] == "AMD EPYC 9R14"
    assert info["isa"] == ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"]  # in ISA_FLAGS order
    assert info["torch_cpu_capability"] in {"DEFAULT", "AVX2", "AVX512", "ZVECTOR", "VSX", "NO AVX"}


def test_mixed_precision_tiny(tmp_path):
    from benchmarks import mixed_precision

    mixed_precision.main(["--model", "tiny", "--rows", "4", "--prompt-len", "8", "--completion-len", "8",
                          "--updates", "1", "--repeats", "1", "--threads", "1", "--isa", "native",
                          "--out-dir", str(tmp_path)])  # fmt: skip
    res = json.loads((tmp_path / "mixed_precision.json").read_text())
    # each child a fresh process holding its weights in the mode's master dtype
    order = ["fp32", "bf16-autocast", "bf16-pure"]
    assert [r["mode"] for r in res["runs"]] == order
    assert [r["param_dtype"] for r in res["runs"]] == ["float32", "float32", "bfloat16"]
    assert all(len(r["update_s"]) == 1 and r["peak_rss_gb"] > 0 and r["grad_norms"][0] > 0 for r in res["runs"])
    rows = {r["mode"]: r for r in res["rows"]}
    assert list(rows) == order and rows["fp32"]["vs_fp32"] == 1.0
    # an AdamW step of ~1e-6 moves every fp32 master tensor; bf16 weights near 1.0 (the RMSNorm weights start at
    # exactly 1.0, where a bf16 step below is 3.9e-3) cannot move, nor can most others (step ≥ |w|/256)
    for mode in ("fp32", "bf16-autocast"):
        changed, total = rows[mode]["tensors_changed"].split("/")
        assert changed == total and rows[mode]["norm_changed_frac"] > 0.5
    assert rows["bf16-pure"]["norm_changed_frac"] == 0.0
    assert rows["bf16-pure"]["changed_frac"] < 0.5 * rows["bf16-autocast"]["changed_frac"]
    assert res["machine"]["cpu"] and res["machine"]["torch_cpu_capability"]
    assert res["settings"]["modes"] == ",".join(order)


def test_mixed_precision_alternates_the_order_and_refuses_bad_modes(tmp_path, monkeypatch):
    from benchmarks import mixed_precision

    def fake(args, mode, isa):  # no child process: the order of the measurements and the summary only
        t = {"fp32": 2.0, "bf16-autocast": 1.0, "bf16-pure": 0.5}[mode]
        return {"mode": mode, "isa_requested": isa, "isa": isa.upper(), "compute_dtype": "c", "master_dtype": "m",
                "update_s": [t, t], "peak_rss_gb": t, "changed_frac": t / 2, "norm_changed_frac": 0.0,
                "tensors_changed": 3, "tensors": 4, "load1_start": 0.0, "load1_end": 1.0}  # fmt: skip

    monkeypatch.setattr(mixed_precision, "run_child", fake)
    mixed_precision.main(["--repeats", "2", "--isa", "native,avx2", "--out-dir", str(tmp_path)])
    res = json.loads((tmp_path / "mixed_precision.json").read_text())
    order = ["fp32", "bf16-autocast", "bf16-pure"]
    # repeat 0 in order, repeat 1 reversed, for each ISA in turn
    assert [(r["isa_requested"], r["mode"]) for r in res["runs"]] == (
        [("native", m) for m in order] + [("avx2", m) for m in order]
        + [("native", m) for m in order[::-1]] + [("avx2", m) for m in order[::-1]]
    )  # fmt: skip
    assert [(r["isa"], r["mode"], r["vs_fp32"], r["n"], r["tensors_changed"]) for r in res["rows"]] == [
        (isa, m, v, 4, "3/4") for isa in ("NATIVE", "AVX2") for m, v in zip(order, [1.0, 0.5, 0.25], strict=True)
    ]
    with pytest.raises(SystemExit, match="must start with fp32"):
        mixed_precision.main(["--modes", "bf16-pure,fp32", "--out-dir", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="unknown bf8"):
        mixed_precision.main(["--modes", "fp32,bf8", "--out-dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
