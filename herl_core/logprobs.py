"""Per-token log-probs of each response under its own prompt (spec §3.10), for the training forward pass.

Layout (the veRL layout, rl_dataset.py / dp_actor): every row is ``[pad … pad | prompt | completion | pad … pad]``,
prompts **left**-padded to the batch's longest prompt ``P`` and completions **right**-padded to the longest
completion ``R``. So completion token j of every row sits at column ``P + j`` and is predicted by the logits at
column ``P + j - 1`` (logits at position t predict token t+1). ``position_ids`` count real tokens only, so padding
changes no value.

Only the last ``R + 1`` positions go through the LM head (``logits_to_keep``), and the log-softmax is taken as
``logit[token] - logsumexp(logits)`` in float32, so no (B, T, V) log-prob tensor is built. The guided slot's prompt
is whatever prompt the caller packs (the hindsight prompt under ``hindsight.train_prompt: hindsight``, spec §3.9).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Batch:
    """Packed (prompt, completion) pairs. Shapes: B rows, T = P + R columns, R completion columns."""

    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long, 1 = real token
    position_ids: torch.Tensor  # (B, T) long, 0 at each row's first real token
    response_mask: torch.Tensor  # (B, R) float, 1 = completion token
    prompt_width: int  # P: completion token j of every row is input_ids[:, P + j]

    @property
    def response_width(self) -> int:
        """R, the longest completion."""
        return self.response_mask.shape[1]

    @property
    def response_ids(self) -> torch.Tensor:
        """(B, R) completion tokens (pad where ``response_mask`` is 0)."""
        return self.input_ids[:, self.prompt_width :]

    def to(self, device: str | torch.device) -> Batch:
        """The same batch on ``device``."""
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.response_mask.to(device),
            self.prompt_width,
        )


def pack_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int) -> Batch:
    """Left-pad prompts to P, right-pad completions to R, and concatenate (see module docstring)."""
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"pack_batch: {len(prompt_ids)} prompts but {len(completion_ids)} completions")
    if not prompt_ids:
        raise ValueError("pack_batch: empty batch")
    for i, prompt in enumerate(prompt_ids):
        if not prompt:
            raise ValueError(f"pack_batch: prompt {i} is empty (its first completion token would have no context)")
    P = max(len(p) for p in prompt_ids)
    R = max(len(c) for c in completion_ids)
    B = len(prompt_ids)
    input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + R), dtype=torch.long)
    for i, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        row = torch.tensor(list(prompt) + list(completion), dtype=torch.long)
        start = P - len(prompt)
        input_ids[i, start : start + len(row)] = row
        attention_mask[i, start : start + len(row)] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    response_mask = attention_mask[:, P:].float()
    return Batch(input_ids, attention_mask, position_ids, response_mask, P)


def sequence_logprobs(model: Any, batch: Batch, temperature: float = 1.0) -> torch.Tensor:
    """(B, R) log-probs of the completion tokens, zeros where ``response_mask`` is 0. Differentiable.

    logp[b, j] = z[b, P+j-1, y] / τ - logsumexp_v(z[b, P+j-1, v] / τ),  y = input_ids[b, P+j],  τ = temperature,
    where z are the model's logits (position t predicts token t+1).
    """
    if temperature <= 0:
        raise ValueError(f"sequence_logprobs: temperature must be > 0, got {temperature}")
    P, R = batch.prompt_width, batch.response_width
    if R == 0:
        return batch.response_mask.clone()
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=R + 1,  # positions P-1 … P+R-1; the last one predicts past the end and is dropped
        use_cache=False,
    )
    logits = out.logits[:, :-1, :].float()  # (B, R, V)
    if temperature != 1.0:  # x / 1 == x exactly: skip the (B, R, V) copy
        logits = logits / temperature
    targets = batch.input_ids[:, P:].unsqueeze(-1)  # (B, R, 1)
    logp = logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (B, R)
    return logp * batch.response_mask
