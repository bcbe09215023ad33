"""herl_core.rollout.packed: oneDNN linears with packed weights during CPU decoding.

Run: .venv/bin/pytest tests/herl_core/rollout/test_packed.py
"""

from __future__ import annotations

import platform

import pytest
import torch
from torch import nn

from herl_core.rollout.base import SamplingParams
from herl_core.rollout.hf import HFEngine
from herl_core.rollout.packed import available, packed_linears

needs_onednn = pytest.mark.skipif(not available(), reason="this torch has no oneDNN packed linear")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(5, 3, bias=False)
        self.wide = nn.Linear(6, 4).double()  # fp64: not packed
        self.hooked = nn.Linear(3, 2)
        self.hooked.forward = lambda x: torch.zeros(x.shape[0], 2)  # an instance forward (as accelerate's hooks set)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


@needs_onednn
def test_packs_fp32_linears_only_and_restores_them():
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(4, 6)
    with torch.inference_mode():
        plain = net(x)
        with packed_linears(net) as switched:
            assert switched == 2  # a and b; not the fp64 one, not the hooked one
            assert "forward" in vars(net.a) and "forward" in vars(net.b) and "forward" not in vars(net.wide)
            packed = net(x)
            rows = net.a(torch.randn(2, 3, 6)[:, -1:, :])  # 3-D, non-contiguous input, as the LM head gets it
        assert "forward" not in vars(net.a) and "forward" not in vars(net.b)
        assert net.hooked(torch.ones(1, 3)).abs().sum() == 0  # its own instance forward is still there
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
    assert rows.shape == (2, 1, 5)


@needs_onednn
def test_values_follow_the_weights_at_entry():
    """Packed at entry: a weight changed by a training step between two blocks is used by the second block."""
    lin = nn.Linear(3, 2, bias=False)
    x = torch.ones(1, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]]))
    with torch.inference_mode(), packed_linears(lin):
        first = lin(x)
    with torch.no_grad():
        lin.weight.mul_(2)
    with torch.inference_mode(), packed_linears(lin):
        second = lin(x)
    assert first.tolist() == [[6.0, 1.0]] and second.tolist() == [[12.0, 2.0]]


def test_disabled_and_errors_leave_the_model_as_it_was():
    lin = nn.Linear(3, 2)
    with packed_linears(lin, enabled=False) as switched:
        assert switched == 0 and "forward" not in vars(lin)
    with pytest.raises(RuntimeError, match="boom"), packed_linears(lin):
        raise RuntimeError("boom")
    assert "forward" not in vars(lin)


@needs_onednn
def test_engine_with_and_without_packing_agree(policy, prompts, same_draws):
    """oneDNN's packed kernel and torch.mm sum in other orders: equal up to float rounding (tokens up to the first
    near-tie draw, log-probs within tolerance), greedy and sampled."""
    model, tok = policy
    for sampling in (SamplingParams(temperature=0.0, max_new_tokens=8), SamplingParams(max_new_tokens=8, seed=2)):
        on = HFEngine(model, tok).generate(prompts, 2, sampling)
        off = HFEngine(model, tok, pack_linears=False).generate(prompts, 2, sampling)
        same_draws(on, off)
    assert all("forward" not in vars(m) for m in model.modules())  # restored after generate


@needs_onednn
def test_leaving_the_block_trims_the_heap_once(monkeypatch):
    import herl_core.rollout.packed as packed

    calls = []
    monkeypatch.setattr(packed, "trim_heap", lambda: calls.append(1) or True)
    with torch.inference_mode(), packed.packed_linears(Net()):
        pass
    assert calls == [1]
    with packed.packed_linears(Net(), enabled=False):  # nothing packed, nothing to hand back
        pass
    assert calls == [1]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_trim_heap_calls_glibc():
    from herl_core.memory import trim_heap

    assert trim_heap() is True
