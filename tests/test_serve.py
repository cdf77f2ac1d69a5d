"""`eagle3 serve`, driven by the openai client over loopback: answers equal `generate` of the same prompt alone
(concurrent requests, streamed or not), cancelled streams free their rows, a full queue gets 429, bad
requests get the OpenAI error shape with the right status, and SIGTERM stops the server cleanly."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from oracles import TargetOracle

from eagle3.runtimes.target import encode_messages
from eagle3.methods.drafter import NoDrafter
from eagle3.decoding.engine import Engine, Request
from eagle3.decoding.generate import generate
from eagle3.runtimes.model import load_model
from eagle3.decoding.sampling import SamplingParams
from eagle3.serving.app import create_app
from eagle3.serving.scheduler import Scheduler
from eagle3.decoding.tree import TreeSpec

PROMPTS = ["Once upon a time", "Tom had a big red", "One day, a little girl named Lily went to the park", "The cat",
           "Sara and Ben were playing in the garden", "Max", "There was a big tree in the forest", "Mia liked to",
           "The sun was hot", "A little bird", "Ben and his dog", "It was a rainy day", "The boy saw a", "Lily",
           "Once there was a kind", "The red ball"]  # fmt: skip
KEY = "secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The app on uvicorn in a thread, on a free loopback port."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def metric(self, name: str) -> float:
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        raise KeyError(name)


def own_target(stories):
    """A target with its own model (a model holds one KV cache: the tests decode beside the server)."""
    from eagle3.runtimes.target import load_target

    return load_target(str(stories.path), device="cpu")


@pytest.fixture(scope="module")
def fast(stories):
    """Speculative decoding with an oracle draft (long accepted runs: several tokens per streamed chunk), 4 rows."""
    target = own_target(stories)
    engine = Engine(target, TargetOracle(load_model(stories.path, device="cpu")), TreeSpec(12, 4, 2), max_rows=4)
    server = Server(create_app(Scheduler(engine, 256, max_queue=64), target, "stories"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def slow(stories):
    """Plain decoding, one row, one waiting place, an API key, and rounds slowed to 20 ms so that a request
    is still running when the test acts on it."""
    target = own_target(stories)
    engine = Engine(target, NoDrafter(), max_rows=1)
    step = engine.step
    engine.step = lambda: (time.sleep(0.02), step())[1]
    server = Server(create_app(Scheduler(engine, 512, max_queue=1), target, "stories", api_key=KEY))
    yield server
    server.stop()


def client(server: Server, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


def alone(stories, prompt_ids, max_tokens, sampling=SamplingParams()):
    return generate(stories, prompt_ids, max_tokens, sampling)


def test_health_models_and_metrics(fast):
    assert httpx.get(f"{fast.url}/health").json() == {"status": "ok"}
    assert [m.id for m in client(fast).models.list().data] == ["stories"]
    text = httpx.get(f"{fast.url}/metrics").text
    assert "# TYPE eagle3_requests_total counter" in text and "eagle3_time_to_first_token_seconds_count" in text


def test_chat_and_completions_streamed_or_not_equal_generate(stories, fast):
    c = client(fast)
    messages = [{"role": "system", "content": "A story."}, {"role": "user", "content": "Once upon a time"}]
    expected = alone(stories, encode_messages(stories, messages), 40)
    reply = c.chat.completions.create(model="stories", messages=messages, max_tokens=40, temperature=0)
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.completion_tokens == expected.new_tokens
    assert reply.usage.prompt_tokens == len(encode_messages(stories, messages))
    assert reply.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    chunks = list(c.chat.completions.create(model="stories", messages=messages, max_tokens=40, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected.text
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) > 1  # it streamed
    assert chunks[-1].usage.completion_tokens == expected.new_tokens and not chunks[-1].choices

    prompt = "Tom had a big red"
    expected = alone(stories, stories.encode(prompt), 30)
    reply = c.completions.create(model="stories", prompt=prompt, max_tokens=30, temperature=0)
    assert reply.choices[0].text == expected.text and reply.usage.completion_tokens == expected.new_tokens
    streamed = c.completions.create(model="stories", prompt=prompt, max_tokens=30, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == expected.text
    by_ids = c.completions.create(model="stories", prompt=stories.encode(prompt), max_tokens=30, temperature=0)
    assert by_ids.choices[0].text == expected.text


def test_sixteen_concurrent_requests_each_equal_generate_alone(stories, fast):
    """16 at once on 4 rows (the rest queue and join as rows free up), half streamed: no token lost,
    duplicated or reordered, every answer what the prompt gets alone; the stop string is honoured too."""
    budgets = [20 + 7 * i for i in range(len(PROMPTS))]
    expected = [alone(stories, stories.encode(p), b) for p, b in zip(PROMPTS, budgets)]
    c = client(fast)

    def ask(i: int) -> tuple[str, int]:
        args = dict(model="stories", prompt=PROMPTS[i], max_tokens=budgets[i], temperature=0)
        if i % 2:
            chunks = list(c.completions.create(**args, stream=True, stream_options={"include_usage": True}))
            return "".join(ch.choices[0].text for ch in chunks if ch.choices), chunks[-1].usage.completion_tokens
        reply = c.completions.create(**args)
        return reply.choices[0].text, reply.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(len(PROMPTS))))
    assert answers == [(e.text, e.new_tokens) for e in expected]
    assert fast.metric("eagle3_running_requests") == 0 and fast.metric("eagle3_queue_depth") == 0
    assert fast.metric("eagle3_tau") > 2  # the oracle's runs were accepted


def test_a_stop_string_ends_the_answer_before_it(stories, fast):
    full = alone(stories, stories.encode("Once upon a time"), 60).text
    stop = full.split()[5]
    reply = client(fast).completions.create(model="stories", prompt="Once upon a time", max_tokens=60,
                                            temperature=0, stop=[stop])  # fmt: skip
    assert reply.choices[0].text == full[: full.index(stop)] and reply.choices[0].finish_reason == "stop"


def test_a_seeded_sampled_request_is_the_engine_alone_with_that_seed(stories, fast):
    """The server samples exactly as the engine does alone (whose distribution test_batch checks)."""
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=123)
    ids = stories.encode("The cat")
    engine = Engine(stories, TargetOracle(load_model(stories.path, device="cpu")), TreeSpec(12, 4, 2))
    expected = engine.run([Request(ids, 40, params)])[0]
    reply = client(fast).completions.create(model="stories", prompt="The cat", max_tokens=40, temperature=0.9,
                                            top_p=0.95, seed=123, extra_body={"top_k": 40})  # fmt: skip
    assert reply.choices[0].text == expected.text


def test_a_cancelled_stream_frees_its_row(slow):
    c = client(slow, KEY)
    before = slow.metric('eagle3_requests_total{outcome="cancelled"}')
    stream = c.completions.create(model="stories", prompt="Once upon a time", max_tokens=400, temperature=0,
                                  stream=True)  # fmt: skip
    next(iter(stream))
    stream.close()  # the client goes away with its row still decoding
    reply = c.completions.create(model="stories", prompt="The cat", max_tokens=5, temperature=0)  # the one row
    assert reply.usage.completion_tokens == 5
    assert slow.metric('eagle3_requests_total{outcome="cancelled"}') == before + 1
    assert slow.metric("eagle3_running_requests") == 0


def test_a_client_that_hangs_up_on_a_plain_request_frees_its_row(slow):
    before = slow.metric('eagle3_requests_total{outcome="cancelled"}')
    with pytest.raises(httpx.ReadTimeout):  # the client gives up long before the 400 tokens are done
        httpx.post(f"{slow.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=1.0,
                   json={"model": "stories", "prompt": "Once", "max_tokens": 400, "temperature": 0})  # fmt: skip
    deadline = time.monotonic() + 10
    while slow.metric('eagle3_requests_total{outcome="cancelled"}') < before + 1:
        assert time.monotonic() < deadline, "the abandoned request kept its row"
        time.sleep(0.05)
    assert slow.metric("eagle3_running_requests") == 0


def test_a_full_queue_gets_429_with_retry_after(slow):
    c = client(slow, KEY)
    running = c.completions.create(model="stories", prompt="Once", max_tokens=400, temperature=0, stream=True)
    next(iter(running))  # it holds the only row
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        queued = pool.submit(c.completions.create, model="stories", prompt="Tom", max_tokens=3, temperature=0)
        deadline = time.monotonic() + 10
        while slow.metric("eagle3_queue_depth") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        refused = httpx.post(f"{slow.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                             json={"model": "stories", "prompt": "Ben", "max_tokens": 3})  # fmt: skip
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        running.close()
        assert queued.result(timeout=30).usage.completion_tokens == 3


@pytest.mark.parametrize("body, status, words", [
    ("{not json", 400, "not valid JSON"),
    ({"model": "gpt-4", "prompt": "Hi"}, 404, "does not exist"),
    ({"model": "stories", "prompt": "Hi", "max_tokens": 100_000}, 400, "context is 512 tokens"),
    ({"model": "stories", "prompt": "Hi", "temperature": -0.5}, 400, "temperature"),
    ({"model": "stories", "prompt": "Hi", "n": 2}, 400, "n must be 1"),
    ({"model": "stories", "prompt": "Hi", "top_p": 0}, 400, "top_p"),
    ({"model": "stories", "prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "stories", "prompt": [10**9]}, 400, "token ids"),
    ({"prompt": "Hi"}, 400, "model"),
])  # fmt: skip
def test_bad_requests_get_the_openai_error_shape(slow, body, status, words):
    content = body if isinstance(body, str) else json.dumps(body)
    reply = httpx.post(f"{slow.url}/v1/completions", content=content,
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})  # fmt: skip
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert words in error["message"] and error["type"]


def test_chat_errors_and_the_key(slow):
    headers = {"Authorization": f"Bearer {KEY}"}
    bad = httpx.post(f"{slow.url}/v1/chat/completions", headers=headers,
                     json={"model": "stories", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    assert bad.status_code == 400 and "text content" in bad.json()["error"]["message"]
    empty = httpx.post(f"{slow.url}/v1/chat/completions", headers=headers, json={"model": "stories", "messages": []})
    assert empty.status_code == 400
    with pytest.raises(openai.AuthenticationError):
        client(slow, "wrong").models.list()
    assert httpx.get(f"{slow.url}/health").status_code == 200  # (no key needed)


def test_serve_command_refuses_remote_hosts_and_busy_ports(capsys):
    from eagle3.cli import main

    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "--allow-remote" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", "--port", str(busy.getsockname()[1])]) == 2
        assert "cannot listen" in capsys.readouterr().err


@pytest.mark.parametrize("grace", ["20", "0"])
def test_sigterm_lets_open_requests_finish_within_the_grace_period_and_exits(stories_path, tmp_path, grace):
    """SIGTERM mid-answer: within the grace period the answer completes; past it, the stream ends with an
    OpenAI error event (not a cut connection); either way the server exits with code 0."""
    port = free_port()
    env = {**os.environ, "EAGLE3_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, "-m", "eagle3", "serve", "--target", str(stories_path), "--draft", "none",
                             "--lookup", "3", "--port", str(port), "--grace", grace, "--threads", "1",
                             "--served-model-name", "stories"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        lines = []
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                          json={"model": "stories", "prompt": "Once", "max_tokens": 480, "stream": True,
                                "temperature": 0}) as reply:  # fmt: skip
            for line in reply.iter_lines():
                if not lines:
                    proc.send_signal(signal.SIGTERM)  # mid-answer
                lines.append(line)
        assert proc.wait(timeout=30) == 0
        assert [line for line in lines if line][-1] == "data: [DONE]"
        last = json.loads([line for line in lines if line.startswith("data: {")][-1][6:])
        if grace == "0":
            assert last["error"]["code"] == "shutting_down"
        else:
            assert last["choices"][0]["finish_reason"] in ("length", "stop")  # it was allowed to finish
    finally:
        proc.kill()
