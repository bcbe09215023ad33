"""herl_core.rollout.ray_pool: rollouts on Ray workers equal the in-process engine's up to float rounding (spec §3.2).

Run: .venv/bin/pytest tests/herl_core/rollout/test_ray.py
One local Ray cluster per module (no dashboard). It declares 4 logical CPUs, which are Ray's bookkeeping slots, not
processes: the module's pool holds 2 (2 workers × 1 CPU) while the rollout stage's own 2-worker engine takes the other
2. Ray start and the worker processes' imports dominate the runtime. The tiny model's weights are redrawn with std 1
(as in test_hf.py) so its distributions are peaked: greedy answers differ between prompts, and a perturbation of the
weights visibly changes them.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from herl_core.config import Config, EngineConfig  # noqa: E402
from herl_core.io import read_jsonl  # noqa: E402
from herl_core.records import PromptRecord, RolloutRecord, Rubric  # noqa: E402
from herl_core.rollout import make_engine  # noqa: E402
from herl_core.rollout.base import SamplingParams, stable_key  # noqa: E402
from herl_core.rollout.groups import call_seed, encode_prompts  # noqa: E402
from herl_core.rollout.hf import HFEngine  # noqa: E402
from herl_core.rollout.ray_pool import RayEngine, _import_ray, shard_sizes  # noqa: E402
from herl_core.stages import run_rollout  # noqa: E402

SAMPLE = SamplingParams(temperature=1.0, max_new_tokens=6, seed=3)
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=6)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pool(cluster, policy, tmp_path_factory):
    """(engine, live model, weights_dir): 2 workers over a copy of the policy that the tests may change."""
    model, tok = policy
    live = copy.deepcopy(model)
    weights = tmp_path_factory.mktemp("weights")
    engine = make_engine(EngineConfig(workers=2, worker_cpus=1, weights_dir=str(weights)), live, tok, seed=0)
    assert isinstance(engine, RayEngine)
    yield engine, live, weights
    engine.shutdown()
    assert not any(weights.iterdir())  # shutdown deleted the last version folder


@pytest.fixture
def same(same_draws):
    """Worker output against the in-process engine's: a worker runs 1 thread on a differently padded batch, so float
    reductions run in another order (log-probs within 2e-4; 4e-5 seen on values near 5), and tokens are equal up to
    the first near-tie draw (tests/conftest.py)."""

    def check(got, want) -> None:
        same_draws(got, want, logprob_atol=2e-4)

    return check


def test_shard_sizes_are_contiguous_and_near_equal():
    assert shard_sizes(3, 2) == [2, 1]  # 3 = 2 + 1: the first 3 % 2 = 1 shard gets the extra prompt
    assert shard_sizes(7, 3) == [3, 2, 2]
    assert shard_sizes(1, 2) == [1, 0]


def test_missing_ray_raises_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    with pytest.raises(ImportError, match="pip install ray"):
        _import_ray()


@pytest.mark.parametrize("sampling", [SAMPLE, GREEDY], ids=["sample", "greedy"])
def test_two_workers_equal_the_in_process_engine(pool, policy, prompts, sampling, same):
    engine, _, _ = pool
    model, tok = policy
    keys = tuple(stable_key(f"p{i}") for i in range(3))
    keyed = replace(sampling, keys=keys)
    local = HFEngine(model, tok)
    # 3 prompts on 2 workers: shards of 2 and 1 prompts; n = 2 → 6 generations, prompt-major
    got = engine.generate(prompts, 2, keyed)
    assert [g.prompt_ids for g in got] == [p for p in prompts for _ in range(2)]
    same(got, local.generate(prompts, 2, keyed))
    # keys None: the pool uses the global positions (0, 1, 2), not positions inside a shard
    same(engine.generate(prompts, 2, sampling), local.generate(prompts, 2, sampling))
    # one prompt on two workers: the second worker gets nothing
    last = replace(sampling, keys=keys[2:])
    same(engine.generate(prompts[2:], 2, last), local.generate(prompts[2:], 2, last))
    if sampling.temperature > 0:  # sampling really draws: the two samples of some prompt differ
        assert any(got[2 * i].completion_ids != got[2 * i + 1].completion_ids for i in range(3))


def test_sync_weights_reloads_workers_from_a_new_version_folder(pool, policy, prompts, same):
    engine, live, weights = pool
    _, tok = policy
    original = {k: v.clone() for k, v in live.state_dict().items()}
    old_version = engine.version
    assert sorted(p.name for p in weights.iterdir()) == [f"v{old_version}"]
    before = HFEngine(live, tok).generate(prompts, 1, GREEDY)
    try:
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(1)
            for p in live.parameters():
                if p.dim() >= 2:
                    p.add_(torch.randn_like(p))
        after = HFEngine(live, tok).generate(prompts, 1, GREEDY)
        assert [g.completion_ids for g in after] != [g.completion_ids for g in before]  # the change is visible
        same(engine.generate(prompts, 1, GREEDY), before)  # not synced yet: workers hold the old weights
        engine.sync_weights()
        assert engine.version == old_version + 1
        assert sorted(p.name for p in weights.iterdir()) == [f"v{old_version + 1}"]  # old folder deleted
        same(engine.generate(prompts, 1, GREEDY), after)
    finally:
        live.load_state_dict(original)
        engine.sync_weights()


def test_rollout_stage_with_two_workers_equals_in_process(cluster, tmp_path, policy, draw_margin):
    """The rollout stage's records with 2 workers equal the in-process ones, row by row, wherever the row's draws are
    clear of a near-tie (the workers generate other batch layouts: float rounding; tests/conftest.py). The model is the
    std-1 tiny policy saved as a folder: the tiny profile's model spreads its mass over 49k tokens, where every draw is
    a near-tie."""
    model, tok = policy
    folder = tmp_path / "peaked"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    records = [
        PromptRecord(id=f"p{i}", prompt=text, rubrics=[Rubric(id="punctuation:no_comma")])
        for i, text in enumerate(["Write a note about cats.", "Describe the sea.", "Explain rain."])
    ]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(r.model_dump_json() + "\n" for r in records))

    def config(workers: int) -> Config:
        return Config.model_validate(
            {
                "model": {"name_or_path": str(folder)},
                "rollout": {"n": 2, "max_new_tokens": 6, "engine": {"workers": workers, "worker_cpus": 1}},
                "probe": {"prompts": 3, "rollout_dir": str(tmp_path / f"rollout-{workers}")},
                "train": {"data": str(data)},
            }
        )

    def rollouts(workers: int) -> list[RolloutRecord]:
        cfg = config(workers)
        run_rollout(cfg)
        return read_jsonl(Path(cfg.probe.rollout_dir) / "rollouts.jsonl", RolloutRecord)

    local, pooled = rollouts(0), rollouts(2)
    assert len(local) == 6  # 3 prompts × n = 2
    # the in-process stage's draws, recomputed with their margins (the same engine and layout: the same numbers)
    cfg = config(0)
    sampling = SamplingParams(
        cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k, cfg.rollout.max_new_tokens,
        call_seed(cfg.train.seed, 0, 0), tuple(stable_key(r.id) for r in records),
    )  # fmt: skip
    gens = HFEngine.from_config(cfg.rollout.engine, model, tok).generate(
        encode_prompts(records, tok, cfg.rollout), 2, sampling
    )
    assert [g.text for g in gens] == [r.response for r in local]
    clear = [min(g.margins) > draw_margin for g in gens]
    assert sum(clear) >= len(clear) / 2, "too few rows clear of near-ties to compare; change the prompts"
    assert [(r.prompt_id, r.sample_index) for r in pooled] == [(r.prompt_id, r.sample_index) for r in local]
    for ok, a, b in zip(clear, pooled, local, strict=True):
        if ok:
            assert a.model_dump() == b.model_dump()
