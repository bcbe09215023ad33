"""LLM judge client (spec §4.2, §9-A12) against a real scripted HTTP server on 127.0.0.1 (ephemeral port)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from herl_core.config import JudgeConfig, RewardConfig
from herl_core.records import PromptRecord, Rubric
from herl_core.rewards import make_reward
from herl_core.rewards.judge import SYSTEM_PROMPT, JudgeReward, build_messages, parse_results

KEY_ENV = "HERL_TEST_JUDGE_KEY"
KEY = "sk-test-SECRET-0123456789"


@dataclass
class Reply:
    """One scripted answer: a chat ``content`` (wrapped in choices) or a raw ``body``, after ``delay`` seconds."""

    status: int = 200
    content: str | None = None
    body: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


Script = list[Reply | Callable[[dict], Reply]]


class JudgeServer:
    """Answers POSTs from ``script`` in order (a callable gets the request JSON); records every request."""

    def __init__(self) -> None:
        self.script: Script = []
        self.default: Reply | Callable[[dict], Reply] | None = None
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def next_reply(self, payload: dict, auth: str | None, path: str) -> Reply:
        with self.lock:
            self.requests.append({"payload": payload, "auth": auth, "path": path})
            step = self.script.pop(0) if self.script else self.default
        if step is None:
            return Reply(status=599, body="script exhausted")
        return step(payload) if callable(step) else step

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                auth = self.headers.get("Authorization")
                reply = server.next_reply(payload, auth, self.path)
                time.sleep(reply.delay)
                text = reply.body
                if text is None:
                    text = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply.content}}]})
                if "{auth}" in text:  # a server that echoes the credentials back (leak test)
                    text = text.replace("{auth}", auth or "")
                data = text.encode()
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = JudgeServer()
    yield srv
    srv.close()


@pytest.fixture
def judge(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    # timeout 5 s: a loaded CI machine can take well over 0.3 s to answer a local request; the timeout tests set
    # their own short timeout against a much longer scripted delay
    cfg = JudgeConfig(
        base_url=server.url, model="judge-test", api_key_env=KEY_ENV, timeout_s=5.0, max_retries=2, backoff_s=0.01
    )
    client = JudgeReward(cfg)
    yield client
    client.close()


def rec(weights: list[float], prompt: str = "How do I treat a mild burn?") -> PromptRecord:
    rubrics = [
        Rubric(id=f"r{k}", kind="judge", description=f"Rubric number {k}.", weight=w) for k, w in enumerate(weights)
    ]
    return PromptRecord(id="q1", prompt=prompt, rubrics=rubrics, source="test")


def ok(results: list) -> Reply:
    return Reply(content=json.dumps({"results": results}))


# --------------------------------------------------------------------------------------------------------------------
# parsing (pure)


@pytest.mark.parametrize(
    ("text", "n", "expected"),
    [
        ('{"results": [1, 0, 1]}', 3, [1, 0, 1]),
        ('noise {"results": [true, false]} noise', 2, [1, 0]),
        ('```json\n{"results": [0, 1]}\n```', 2, [0, 1]),
        ('{"rubrics": ["yes", "no", "PASS"]}', 3, [1, 0, 1]),
        ('{"checks": [1]}', 3, [1, 0, 0]),  # missing entries count 0
        ("[1, 1]", 2, [1, 1]),  # a bare list
        ('{"results": [0.5, 2, "maybe"]}', 3, [0, 1, 0]),  # numbers ≥ 1 → 1; unknown strings → 0
        ('{"results": [1, 1, 1, 1]}', 2, [1, 1]),  # extra entries ignored
        ('{"results": [{"id": 2, "pass": true}, {"id": 1, "satisfied": 0}]}', 2, [0, 1]),
        ('{"results": [{"satisfied": "met"}, {"index": 9, "met": 1}]}', 2, [1, 1]),  # bad index → list order
        ("I cannot judge this.", 2, None),
        ('{"results": []}', 2, None),
        ('{"results": "all good"}', 2, None),
        ('{"verdict": [1, 1]}', 2, None),
        ("", 1, None),
    ],
)
def test_parse_results(text, n, expected):
    assert parse_results(text, n) == expected


def test_messages_have_the_reference_shape():
    record = rec([2, 1, -0.5])
    system, user = build_messages(record.prompt, "Cool it under running water.", record.rubrics)
    assert system == {"role": "system", "content": SYSTEM_PROMPT}
    assert user["role"] == "user"
    text = user["content"]
    assert text.startswith("Evaluate the response against each rubric independently.\n\n<prompt>\nHow do I treat")
    assert "<response>\nCool it under running water.\n</response>" in text
    rubrics = (
        "<rubrics>\n1. Rubric number 0. (weight: 2)\n2. Rubric number 1. (weight: 1)\n"
        "3. Rubric number 2. (weight: -0.5)\n</rubrics>"
    )
    assert rubrics in text
    assert text.endswith('Return only JSON: {"results": [0 or 1, ...]}')


# --------------------------------------------------------------------------------------------------------------------
# over HTTP


def test_good_json_weighted_score_and_request(judge, server):
    server.script = [ok([1, 0, 1])]
    out = judge.score([rec([2, 1, -1])], ["Cool it under running water."])[0]
    # Σ w·r / Σ w with w < 0 → 0: (2·1 + 1·0 + 0·1) / (2 + 1 + 0) = 2/3
    assert out.score == pytest.approx(2 / 3) and out.dense == pytest.approx(2 / 3) and not out.failed
    assert [(v.rubric_id, v.passed, v.weight) for v in out.verdicts] == [
        ("r0", True, 2),
        ("r1", False, 1),
        ("r2", True, -1),
    ]
    assert out.verdicts[0].description == "Rubric number 0."
    [seen] = server.requests
    assert seen["path"] == "/v1/chat/completions"
    assert seen["auth"] == f"Bearer {KEY}"
    assert seen["payload"]["model"] == "judge-test"
    assert seen["payload"]["temperature"] == 0.1 and seen["payload"]["max_tokens"] == 4096
    assert [m["role"] for m in seen["payload"]["messages"]] == ["system", "user"]
    assert judge.stats == {"calls": 1, "requests": 1, "retries": 0, "failures": 0}


def test_fenced_and_dict_form_answers(judge, server):
    server.script = [
        Reply(content='Here you go:\n```json\n{"results": [1, 1]}\n```\nDone.'),
        Reply(content='{"results": [{"index": 2, "satisfied": "yes"}, {"index": 1, "met": false}]}'),
    ]
    first = judge.score([rec([1, 3])], ["a"])[0]
    second = judge.score([rec([1, 3])], ["b"])[0]
    assert first.score == 1.0
    assert [v.passed for v in second.verdicts] == [False, True]
    assert second.score == pytest.approx(0.75)  # 3 / (1 + 3)


def test_garbage_is_retried_then_fails(judge, server):
    server.script = [Reply(content="I think it is fine."), ok([1])]
    assert judge.score([rec([1])], ["a"])[0].score == 1.0
    assert len(server.requests) == 2  # garbage, then retried
    server.default = Reply(content="no json here")
    out = judge.score([rec([1])], ["a"])[0]
    assert out.failed and out.score is None and out.dense is None
    assert "unparsable" in out.error and "3 attempt" in out.error
    assert len(server.requests) == 2 + 3  # 1 try + 2 retries
    assert judge.stats == {"calls": 2, "requests": 5, "retries": 3, "failures": 1}


def test_timeout_is_retried(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    cfg = JudgeConfig(base_url=server.url, api_key_env=KEY_ENV, timeout_s=1.5, max_retries=2, backoff_s=0.01)
    server.script = [Reply(content=json.dumps({"results": [1]}), delay=4.0), ok([0])]  # 4 s > timeout 1.5 s
    with JudgeReward(cfg) as judge:
        out = judge.score([rec([1])], ["a"])[0]
        assert out.score == 0.0 and not out.failed  # the second (fast) answer counts
        assert len(server.requests) == 2 and judge.stats["retries"] == 1


def test_500_then_ok(judge, server):
    server.script = [Reply(status=500, body="boom"), ok([1, 1])]
    out = judge.score([rec([1, 1])], ["a"])[0]
    assert out.score == 1.0 and len(server.requests) == 2


def test_429_honours_retry_after(judge, server):
    server.script = [Reply(status=429, body="slow down", headers={"Retry-After": "0.4"}), ok([1])]
    start = time.monotonic()
    out = judge.score([rec([1])], ["a"])[0]
    assert out.score == 1.0 and len(server.requests) == 2
    assert time.monotonic() - start >= 0.4  # back-off alone would be 0.01 s


def test_retry_after_is_capped(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    cfg = JudgeConfig(base_url=server.url, api_key_env=KEY_ENV, timeout_s=5.0, max_retries=1, backoff_s=0.01)
    server.script = [Reply(status=429, body="", headers={"Retry-After": "30"}), ok([1])]
    start = time.monotonic()
    with JudgeReward(cfg, retry_after_cap_s=0.1) as capped:
        assert capped.score([rec([1])], ["a"])[0].score == 1.0
    assert time.monotonic() - start < 15  # waited 0.1 s, not the 30 s the server asked for


def test_always_500_fails_without_leaking_the_key(judge, server):
    server.default = Reply(status=500, body="internal error; you sent {auth}")  # echoes the key back
    out = judge.score([rec([1, 1])], ["a"])[0]
    assert out.failed and out.score is None and out.dense is None and out.verdicts == []
    assert "HTTP 500" in out.error and "3 attempt" in out.error
    assert len(server.requests) == 3  # first try + max_retries = 2
    assert all(r["auth"] == f"Bearer {KEY}" for r in server.requests)
    assert KEY not in out.error and "***" in out.error
    assert KEY not in repr(judge) and KEY not in repr(out)
    assert judge.stats["failures"] == 1 and judge.stats["retries"] == 2


def test_client_error_is_not_retried(judge, server):
    server.default = Reply(status=401, body='{"error": "bad key"}')
    out = judge.score([rec([1])], ["a"])[0]
    assert out.failed and "HTTP 401" in out.error and len(server.requests) == 1


def test_connection_refused_fails_after_retries(monkeypatch):
    probe = JudgeServer()  # take a free port, then close it: nothing listens there
    url = probe.url
    probe.close()
    cfg = JudgeConfig(base_url=url, api_key_env=KEY_ENV, timeout_s=5.0, max_retries=2, backoff_s=0.01)
    with JudgeReward(cfg) as client:
        out = client.score([rec([1])], ["a"])[0]
        assert out.failed and "connection error" in out.error
        assert client.stats == {"calls": 1, "requests": 3, "retries": 2, "failures": 1}


def test_concurrent_calls_keep_order(judge, server):
    # The answer depends on the response text, so results can be matched to inputs whatever the arrival order.
    def by_content(payload: dict) -> Reply:
        return Reply(
            content=json.dumps({"results": [1 if "GOOD" in payload["messages"][1]["content"] else 0]}), delay=0.5
        )

    server.default = by_content
    responses = ["GOOD", "bad", "GOOD", "bad", "bad", "GOOD", "bad", "GOOD"]
    start = time.monotonic()
    out = judge.score([rec([1])] * 8, responses)
    elapsed = time.monotonic() - start
    assert [r.score for r in out] == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    assert elapsed < 8 * 0.5 * 0.75  # 16 threads by default: the 0.5 s answers overlap (one after another: 4 s)
    assert judge.stats["calls"] == 8 and len(server.requests) == 8


def test_no_key_means_no_authorization_header(server, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    server.script = [ok([1])]
    with JudgeReward(JudgeConfig(base_url=server.url, api_key_env=KEY_ENV, timeout_s=5.0)) as client:
        assert client.score([rec([1])], ["a"])[0].score == 1.0
    assert server.requests[0]["auth"] is None


def test_input_checks_and_factory(judge):
    assert judge.score([], []) == []
    with pytest.raises(ValueError, match="1 prompts but 2 responses"):
        judge.score([rec([1])], ["a", "b"])
    reward = make_reward(RewardConfig(type="judge", judge=judge.cfg))
    assert isinstance(reward, JudgeReward) and reward.cfg == judge.cfg
    reward.close()
