"""Weighted-rubric LLM judge over an OpenAI-compatible ``/chat/completions`` endpoint (spec §4.2).

One call per response, all of its rubrics in that call. The judge answers ``{"results": [0/1, ...]}`` and

    score = Σ_k w_k · r_k / Σ_k w_k,   w_k < 0 → 0   (r_k ∈ {0, 1}; missing entries count 0)

Prompt shape, parsing and retry policy follow the reference (``rar_implicit.py``): system + user message, rubrics as
``k. <description> (weight: w)``; a fenced JSON block, else the outermost ``{...}``, else ``[...]``; keys
``results`` / ``rubrics`` / ``checks``; items as ints, bools, strings or dicts with index/id and
satisfied/met/pass; retries with exponential back-off on HTTP 429, HTTP ≥ 500, timeouts and connection errors.

Departures from the authors' code:

1. **Failures are flagged, never scored 0 (§9-A12).** After the last retry, or when no body could be parsed, the
   result is ``RewardResult(score=None, dense=None, failed=True, error=...)``; the reference returns 0.0 with no
   flag, which trains on a judge outage as if every rubric were unmet.
2. An unparsable body is retried like an HTTP error (the reference gives up on it at once).
3. ``Retry-After`` (seconds) is honoured, capped at ``retry_after_cap_s``; there is no random jitter.
4. Other 4xx answers (bad request, auth) fail at once: retrying cannot fix them.
5. A constraint-kind rubric with no description is shown to the judge as its checker's description.
6. No repetition detector (the reference has none for the judge): dense = score.

The API key is read from the environment variable named by ``JudgeConfig.api_key_env`` and sent only as a Bearer
header; it never appears in errors, logs or ``repr()``. Without the variable, no Authorization header is sent
(local servers).
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from herl_core.config import JudgeConfig, RewardConfig
from herl_core.records import PromptRecord, RewardResult, Rubric, Verdict
from herl_core.rewards.base import register_reward, result_from_verdicts

SYSTEM_PROMPT = (
    "You are an expert evaluator. For each rubric item, decide whether the response satisfies it. "
    'Return a JSON object with a single key "results" whose value is a list of 0/1 integers. '
    "The list length must equal the number of rubrics and each entry corresponds to the rubric with the same index."
)
USER_TEMPLATE = (
    "Evaluate the response against each rubric independently.\n\n"
    "<prompt>\n{prompt}\n</prompt>\n\n"
    "<response>\n{response}\n</response>\n\n"
    "<rubrics>\n{rubrics}\n</rubrics>\n\n"
    'Return only JSON: {{"results": [0 or 1, ...]}}'
)
log = logging.getLogger(__name__)
_YES = {"1", "true", "yes", "y", "pass", "met", "satisfied"}
_NO = {"0", "false", "no", "n", "fail", "not", "unsatisfied"}


class JudgeError(RuntimeError):
    """One judge call that did not give a usable answer; ``retryable`` says whether trying again may help."""

    def __init__(self, message: str, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


# --------------------------------------------------------------------------------------------------------------------
# prompt and parsing


def rubric_text(rubric: Rubric, prompt: str) -> str:
    """The rubric as the judge sees it: its description, or the checker's for a bare constraint rubric."""
    if rubric.description and rubric.description.strip():
        return rubric.description.strip()
    from herl_core.rewards.constraints import describe

    return describe(rubric, prompt)


def build_messages(prompt: str, response: str, rubrics: Sequence[Rubric]) -> list[dict[str, str]]:
    """System + user messages; rubrics listed as ``k. <description> (weight: w)``, k from 1."""
    lines = [f"{k}. {rubric_text(r, prompt)} (weight: {r.weight:g})" for k, r in enumerate(rubrics, start=1)]
    user = USER_TEMPLATE.format(prompt=prompt, response=response, rubrics="\n".join(lines))
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def _json_block(text: str) -> Any:
    """A fenced JSON block, else the outermost {...}, else the outermost [...]; None if nothing parses."""
    fenced = re.search(r"```(?:json)?\s*(\{.*?\}|\[.*?\])\s*```", text, re.DOTALL)
    if fenced:
        block = fenced.group(1)
    else:
        spans = [(text.find(o), text.rfind(c)) for o, c in ("{}", "[]")]
        block = next((text[a : b + 1] for a, b in spans if a != -1 and b > a), None)
    if block is None:
        return None
    try:
        return json.loads(block)
    except json.JSONDecodeError:
        return None


def _binary(value: Any) -> int | None:
    """1/0 from a bool, a number (≥ 1 → 1) or a yes/no-like string; None when it is none of these."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return 1 if value >= 1 else 0
    if isinstance(value, str):
        low = value.strip().lower()
        return 1 if low in _YES else 0 if low in _NO else None
    return None


def _dict_items(items: list[dict[str, Any]], n: int) -> list[int | None]:
    """Dict items: position from index/id/rubric_index (1-based, else list order), flag from satisfied/met/pass."""
    out: list[int | None] = [None] * n
    for i, item in enumerate(items):
        key = next((k for k in ("index", "id", "rubric_index") if k in item), None)
        try:
            pos = int(item[key]) - 1 if key else None
        except (TypeError, ValueError):
            pos = None
        if pos is None or not 0 <= pos < n:
            pos = i if i < n else None
        value = next((item[k] for k in ("satisfied", "met", "pass") if item.get(k) is not None), None)
        if pos is not None and out[pos] is None:
            out[pos] = _binary(value) or 0
    return out


def parse_results(text: str, n: int) -> list[int] | None:
    """The judge's 0/1 per rubric (missing entries → 0), or None when nothing usable is in ``text``."""
    parsed = _json_block(text or "")
    if isinstance(parsed, dict):
        parsed = next((parsed[k] for k in ("results", "rubrics", "checks") if parsed.get(k) is not None), None)
    if not isinstance(parsed, list) or not parsed:
        return None
    if all(isinstance(item, dict) for item in parsed):
        flags = _dict_items(parsed, n)
    else:
        flags = [_binary(item) or 0 for item in parsed[:n]] + [None] * max(0, n - len(parsed))
    if all(f is None for f in flags):
        return None
    return [f or 0 for f in flags]


# --------------------------------------------------------------------------------------------------------------------
# HTTP


def _retry_after(header: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date); None if absent or unreadable."""
    if not header:
        return None
    try:
        return max(0.0, float(header))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(header).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class JudgeReward:
    """§4.2 reward: one judge call per response, run concurrently (``max_concurrency`` threads)."""

    def __init__(self, cfg: JudgeConfig, retry_after_cap_s: float = 30.0) -> None:
        self.cfg = cfg
        self.retry_after_cap_s = retry_after_cap_s
        self._url = cfg.base_url.rstrip("/") + "/chat/completions"
        key = os.environ.get(cfg.api_key_env, "")
        self._secret = key  # only for scrubbing messages; never printed
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        limits = httpx.Limits(max_connections=cfg.max_concurrency, max_keepalive_connections=cfg.max_concurrency)
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(cfg.timeout_s), limits=limits)
        self._lock = threading.Lock()
        self._stats = {"calls": 0, "requests": 0, "retries": 0, "failures": 0}

    def __repr__(self) -> str:
        return (
            f"JudgeReward(base_url={self.cfg.base_url!r}, model={self.cfg.model!r}, key_env={self.cfg.api_key_env!r})"
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> JudgeReward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def stats(self) -> dict[str, int]:
        """Counts since creation: calls (responses judged), requests (HTTP attempts), retries, failures."""
        with self._lock:
            return dict(self._stats)

    def _count(self, name: str) -> None:
        with self._lock:
            self._stats[name] += 1

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def score(self, prompts: Sequence[PromptRecord], responses: Sequence[str]) -> list[RewardResult]:
        """One RewardResult per (prompt, response) pair; failed calls come back flagged with score None."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            return []
        workers = min(self.cfg.max_concurrency, len(prompts))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="herl-judge") as pool:
            return list(pool.map(self.judge_one, prompts, responses))

    def judge_one(self, record: PromptRecord, response: str) -> RewardResult:
        """Judge one response against all rubrics of its prompt (with retries)."""
        self._count("calls")
        messages = build_messages(record.prompt, response, record.rubrics)
        try:
            flags = self._call_with_retries(messages, len(record.rubrics))
        except JudgeError as exc:
            self._count("failures")
            error = self._scrub(str(exc))
            log.warning("judge call for prompt %s failed: %s", record.id, error)
            return RewardResult(score=None, dense=None, failed=True, error=error)
        verdicts = [
            Verdict(rubric_id=r.id, description=rubric_text(r, record.prompt), passed=bool(flag), weight=r.weight)
            for r, flag in zip(record.rubrics, flags, strict=True)
        ]
        return result_from_verdicts(verdicts, response, repetition_check=False)

    def _call_with_retries(self, messages: list[dict[str, str]], n: int) -> list[int]:
        """Try 1 + max_retries times; wait backoff_s · 2^attempt (or Retry-After, capped) between tries."""
        for attempt in range(self.cfg.max_retries + 1):
            try:
                return self._call_once(messages, n)
            except JudgeError as exc:
                if not exc.retryable or attempt == self.cfg.max_retries:
                    raise JudgeError(f"judge failed after {attempt + 1} attempt(s): {exc}", False) from None
                delay = self.cfg.backoff_s * 2**attempt
                if exc.retry_after is not None:
                    delay = min(exc.retry_after, self.retry_after_cap_s)
                self._count("retries")
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _call_once(self, messages: list[dict[str, str]], n: int) -> list[int]:
        """One POST; raises JudgeError (retryable or not) unless the body parses into n flags."""
        payload = {
            "model": self.cfg.model,
            "messages": messages,
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_tokens,
        }
        self._count("requests")
        try:
            resp = self._client.post(self._url, json=payload)
        except httpx.TimeoutException as exc:
            raise JudgeError(f"timeout after {self.cfg.timeout_s}s ({type(exc).__name__})", True) from None
        except httpx.TransportError as exc:
            raise JudgeError(f"connection error ({type(exc).__name__}: {exc})", True) from None
        if resp.status_code == 429 or resp.status_code >= 500:
            wait = _retry_after(resp.headers.get("retry-after"))
            raise JudgeError(f"HTTP {resp.status_code}: {resp.text[:200]!r}", True, wait)
        if resp.status_code >= 400:
            raise JudgeError(f"HTTP {resp.status_code}: {resp.text[:200]!r}", False)
        flags = parse_results(_content(resp), n)
        if flags is None:
            raise JudgeError(f"unparsable judge answer: {_content(resp)[:200]!r}", True)
        return flags


def _content(resp: httpx.Response) -> str:
    """``choices[0].message.content`` of a chat-completions body ('' when absent or not JSON)."""
    try:
        body = resp.json()
        return str(body["choices"][0]["message"]["content"] or "")
    except (ValueError, KeyError, IndexError, TypeError):
        return ""


@register_reward("judge")
def judge_reward(cfg: RewardConfig) -> JudgeReward:
    """``reward.type: judge``: the weighted-rubric LLM judge of ``reward.judge`` (§4.2; no repetition detector)."""
    return JudgeReward(cfg.judge)
