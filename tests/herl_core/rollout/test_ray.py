"""herl_core.rollout.ray_pool: rollouts on Ray workers equal the in-process engine's (spec §3.2, issue 7).

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

import pytest
import torch

ray = pytest.importorskip("ray")

from herl_core.config import Config, EngineConfig  # noqa: E402
from herl_core.io import read_jsonl  # noqa: E402
from herl_core.records import PromptRecord, RolloutRecord, Rubric  # noqa: E402
from herl_core.rollout import make_engine  # noqa: E402
from herl_core.rollout.base import SamplingParams, stable_key  # noqa: E402
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


def same(got, want) -> None:
    """Equal prompts, completion ids, finished flags, texts; log-probs within 2e-4: a worker runs 1 thread on a
    differently padded batch, so float reductions run in another order (4e-5 seen on values near 5)."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert (g.prompt_ids, g.completion_ids, g.finished) == (w.prompt_ids, w.completion_ids, w.finished)
        assert g.text == w.text
        assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=2e-4, rtol=0)


def test_shard_sizes_are_contiguous_and_near_equal():
    assert shard_sizes(3, 2) == [2, 1]  # 3 = 2 + 1: the first 3 % 2 = 1 shard gets the extra prompt
    assert shard_sizes(7, 3) == [3, 2, 2]
    assert shard_sizes(1, 2) == [1, 0]


def test_missing_ray_raises_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    with pytest.raises(ImportError, match="pip install ray"):
        _import_ray()


@pytest.mark.parametrize("sampling", [SAMPLE, GREEDY], ids=["sample", "greedy"])
def test_two_workers_equal_the_in_process_engine(pool, policy, prompts, sampling):
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


def test_sync_weights_reloads_workers_from_a_new_version_folder(pool, policy, prompts):
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


def test_rollout_stage_with_two_workers_equals_in_process(cluster, tmp_path):
    records = [
        PromptRecord(id=f"p{i}", prompt=text, rubrics=[Rubric(id="punctuation:no_comma")])
        for i, text in enumerate(["Write a note about cats.", "Describe the sea.", "Explain rain."])
    ]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(r.model_dump_json() + "\n" for r in records))

    def rollouts(workers: int) -> list[RolloutRecord]:
        out = tmp_path / f"rollout-{workers}"
        cfg = Config.model_validate(
            {
                "model": {"name_or_path": "tiny"},
                "rollout": {"n": 2, "max_new_tokens": 6, "engine": {"workers": workers, "worker_cpus": 1}},
                "probe": {"prompts": 3, "rollout_dir": str(out)},
                "train": {"data": str(data)},
            }
        )
        run_rollout(cfg)
        return read_jsonl(out / "rollouts.jsonl", RolloutRecord)

    local, pooled = rollouts(0), rollouts(2)
    assert len(local) == 6  # 3 prompts × n = 2
    assert [r.model_dump() for r in pooled] == [r.model_dump() for r in local]
