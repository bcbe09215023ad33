"""Config tree: strict nested keys, profiles, overrides and errors that name file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from herl_core.config import Config, ConfigError, load_params

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_reference_defaults_match_spec_section_5():
    c = Config()
    # spec §5.1 IF run / §5.2 defaults
    assert (c.rollout.n, c.rollout.temperature, c.rollout.max_new_tokens) == (8, 1.0, 2048)
    assert (c.hindsight.threshold, c.hindsight.candidate_limit, c.hindsight.bonus_alpha) == (1.0, 16, 0.05)
    assert (c.hindsight.rewrite_temperature, c.hindsight.shaping_gamma, c.hindsight.replace_top_n) == (0.3, 1.0, 1)
    assert (c.train.prompts_per_step, c.train.mini_batch_prompts, c.train.lr) == (64, 32, 1e-6)
    assert (c.train.clip_ratio_low, c.train.clip_ratio_high, c.train.clip_ratio_c) == (0.2, 0.2, 3.0)
    assert (c.train.kl_coef, c.train.weight_decay, c.train.grad_clip, c.train.adv_eps) == (0.0, 0.01, 1.0, 1e-6)
    assert c.model.trust_remote_code is False


def test_misspelt_nested_key_names_file_line_and_field(tmp_path):
    p = write(tmp_path, "model:\n  dtype: float32\nhindsight:\n  enabled: true\n  bonus_alfa: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_params(p)
    assert f"{p}:5: hindsight.bonus_alfa: Extra inputs are not permitted" in str(err.value)


def test_wrong_type_inside_a_profile_points_at_the_profile_line(tmp_path):
    p = write(tmp_path, "profile: small\nprofiles:\n  small:\n    train:\n      steps: many\n")
    with pytest.raises(ConfigError) as err:
        load_params(p)
    assert f"{p}:5: train.steps" in str(err.value)


def test_profile_then_overrides_are_applied_in_order(tmp_path):
    p = write(tmp_path, "train:\n  steps: 1\nprofiles:\n  a:\n    train:\n      steps: 7\n      lr: 0.5\n")
    assert load_params(p).train.steps == 1
    c = load_params(p, profile="a", overrides=["train.steps=9", "hindsight.enabled=false"])
    assert (c.train.steps, c.train.lr, c.hindsight.enabled, c.profile) == (9, 0.5, False, "a")


def test_unknown_profile_and_bad_override_are_errors(tmp_path):
    p = write(tmp_path, "profiles:\n  a: {}\n")
    with pytest.raises(ConfigError, match="unknown profile 'b'"):
        load_params(p, profile="b")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_params(p, overrides=["train.steps"])
    with pytest.raises(ConfigError, match=r"--set train.lr"):
        load_params(p, overrides=["train.lr=-1"])


def test_cross_field_rules_name_both_fields(tmp_path):
    p = write(tmp_path, "train:\n  prompts_per_step: 2\n  mini_batch_prompts: 4\n")
    with pytest.raises(ConfigError, match=r"mini_batch_prompts \(4\) must be <= train.prompts_per_step \(2\)"):
        load_params(p)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("model:\n  lora:\n    enabled: true\n", r"fsdp does not support model.lora"),
        ("rollout:\n  engine:\n    backend: vllm\n", r"fsdp needs the in-process HF rollout engine"),
        ("rollout:\n  engine:\n    workers: 2\n", r"fsdp needs the in-process HF rollout engine"),
    ],
)
def test_fsdp_refuses_what_it_cannot_shard(tmp_path, extra, message):
    assert load_params(write(tmp_path, "train:\n  parallel: fsdp\n")).train.parallel == "fsdp"
    with pytest.raises(ConfigError, match=message):
        load_params(write(tmp_path, "train:\n  parallel: fsdp\n" + extra))
    with pytest.raises(ConfigError, match="parallel"):
        load_params(write(tmp_path, "train:\n  parallel: zero3\n"))


def test_invalid_yaml_and_non_utf8(tmp_path):
    p = write(tmp_path, "train: [1, 2\n")
    with pytest.raises(ConfigError, match=r"params.yaml:\d+: invalid YAML"):
        load_params(p)
    p.write_bytes(b"train:\n  steps: \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_params(p)
    with pytest.raises(ConfigError, match="file not found"):
        load_params(tmp_path / "missing.yaml")


def test_frozen_and_hash_is_stable_and_sensitive():
    a, b = Config(), Config()
    assert a.hash() == b.hash()
    with pytest.raises(ValidationError):
        a.train.steps = 5  # type: ignore[misc]
    assert Config.model_validate({"hindsight": {"bonus_alpha": 0.1}}).hash() != a.hash()


@pytest.mark.parametrize("profile", ["tiny", "cpu", "gpu"])
def test_project_params_yaml_profiles_validate(profile):
    c = load_params(ROOT / "params.yaml", profile=profile)
    assert c.profile == profile


def test_every_key_in_params_yaml_has_a_comment_line_above_it():
    lines = (ROOT / "params.yaml").read_text(encoding="utf-8").splitlines()
    missing = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or ":" not in stripped or stripped.startswith("-"):
            continue
        prev = lines[i - 1].strip() if i else ""
        if not prev.startswith("#"):
            missing.append(f"{i + 1}: {stripped}")
    assert missing == []
    assert isinstance(yaml.safe_load((ROOT / "params.yaml").read_text()), dict)


# ------------------------------------------------------------------ keys of the earlier layout


OLD_LAYOUT = """\
profile: tiny
herl:
  bonus_alpha: 0.1
  prompts: 4
rollout:
  n: 4
  backend: hf
  vllm_gpu_memory_utilization: 0.5
profiles:
  tiny:
    rollout:
      out_dir: data/x
  gpu:
    herl: {}
"""


def test_old_keys_name_their_new_place_with_file_and_line(tmp_path):
    p = write(tmp_path, OLD_LAYOUT)
    with pytest.raises(ConfigError) as err:
        load_params(p, overrides=["herl.enabled=false", "rollout.workers=2", "train.steps=1"])
    lines = str(err.value).splitlines()
    assert lines == [
        "keys of an earlier params layout:",
        f"  {p}:3: herl.bonus_alpha moved to hindsight.bonus_alpha",
        f"  {p}:4: herl.prompts moved to probe.prompts",
        f"  {p}:7: rollout.backend moved to rollout.engine.backend",
        f"  {p}:8: rollout.vllm_gpu_memory_utilization moved to rollout.engine.vllm.gpu_memory_utilization",
        f"  {p}:12: profiles.tiny.rollout.out_dir moved to profiles.tiny.probe.rollout_dir",  # an unchosen profile too
        f"  {p}:14: profiles.gpu.herl moved to profiles.gpu.hindsight",
        f"  {p} (--set herl.enabled): herl.enabled moved to hindsight.enabled",
        f"  {p} (--set rollout.workers): rollout.workers moved to rollout.engine.workers",
    ]


def test_every_moved_key_lands_on_a_field_of_the_new_layout():
    from herl_core.config import MOVED_KEYS, moved_to

    def field_exists(dotted: str) -> bool:
        node = Config
        for part in dotted.split("."):
            fields = getattr(node, "model_fields", {})
            if part not in fields:
                return False
            node = fields[part].annotation
        return True

    for old, new in MOVED_KEYS.items():
        assert field_exists(new), (old, new)
        assert not field_exists(old), old  # the old key is really gone (else it would still load)
    assert moved_to("herl.bonus_alpha") == "hindsight.bonus_alpha"
    assert moved_to("herl.out_dir") == "probe.hindsight_dir"  # the most specific entry wins
    assert moved_to("rollout.n") is None and moved_to("hindsight.enabled") is None


def test_the_new_layout_loads_and_keeps_the_defaults(tmp_path):
    p = write(
        tmp_path,
        "rollout:\n  engine:\n    workers: 2\n    vllm:\n      tensor_parallel_size: 2\n"
        "hindsight:\n  bonus_alpha: 0.1\nprobe:\n  prompts: 3\n",
    )
    c = load_params(p)
    assert (c.rollout.engine.workers, c.rollout.engine.vllm.tensor_parallel_size) == (2, 2)
    assert (c.hindsight.bonus_alpha, c.probe.prompts) == (0.1, 3)
    assert (c.probe.rollout_dir, c.probe.hindsight_dir, c.probe.policy) == ("data/rollout", "data/hindsight", None)
    assert (c.rollout.engine.backend, c.rollout.engine.generation_batch_size) == ("hf", 64)
    assert list(Config.model_fields) == [
        "profile", "model", "reward", "prepare", "rollout", "hindsight", "train", "evaluate", "probe", "tracking"
    ]  # fmt: skip
