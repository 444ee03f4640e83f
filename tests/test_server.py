"""The OpenAI-compatible server (tiny_turboquant.server) behind a live uvicorn on 127.0.0.1, queried with the official
`openai` client: answers, streams, concurrency, disconnects, errors, a schema fuzz pass, and the command itself.

Every server here is started by the test on a free port of 127.0.0.1 and stopped by it; no other network is used."""
import asyncio, json, os, socket, subprocess, sys, threading, time

import httpx
import openai
import pytest
import torch

from tiny_turboquant.cache import TinyKVCache
from tiny_turboquant.models import load_model, sample_text, tiny_model
from tiny_turboquant.server import Engine, byte_tokenizer, cache_factory, make_app, serve

TIMEOUT = 120  # seconds any one client call may take
EXAMPLES = int(os.environ.get("TINY_TURBOQUANT_FUZZ_EXAMPLES", 120))  # per operation and mode (valid, invalid)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    "The decode thread shares 2 cores with uvicorn and the clients; OpenMP threads spinning against them cost 10-50x."
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    tok = byte_tokenizer()
    return tiny_model("llama", vocab_size=len(tok)), tok


def client_for(url, **kw):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT, **kw)


def wait_for(predicate, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate(): return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def tiny_server(tiny):
    model, tok = tiny
    engine = Engine(model, tok, max_batch=8, max_queue=16, max_new_tokens_limit=3000)
    with serve(make_app(engine, "tiny-llama")) as url:
        yield url, engine


def chat(content, **kw):
    return dict(model="tiny-llama", messages=[{"role": "user", "content": content}], **{"temperature": 0, **kw})


def test_chat_stream_completion_models(tiny_server):
    url, _ = tiny_server
    client = client_for(url)
    full = client.chat.completions.create(**chat("Hello there!", max_tokens=30))
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    assert full.usage.completion_tokens == 30 and full.choices[0].finish_reason == "length"
    assert full.usage.total_tokens == full.usage.prompt_tokens + 30
    chunks = list(client.chat.completions.create(**chat("Hello there!", max_tokens=30), stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 30
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    done = client.completions.create(model="tiny-llama", prompt="Once upon a time", max_tokens=12, temperature=0)
    assert done.object == "text_completion" and done.usage.completion_tokens == 12 and done.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-llama", prompt="Once upon a time", max_tokens=12, temperature=0, stream=True))
    assert streamed == done.choices[0].text
    default = client.completions.create(model="tiny-llama", prompt="Once upon a time", temperature=0)
    assert default.usage.completion_tokens == 16  # OpenAI's default for completions

    assert [m.id for m in client.models.list()] == ["tiny-llama"]
    assert client.models.retrieve("tiny-llama").id == "tiny-llama"
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_sampling_parameters(tiny_server):
    url, _ = tiny_server
    client = client_for(url)
    ask = chat("Tell me something.", max_tokens=20, temperature=1.0, top_p=0.9, seed=123, n=3)
    a, b = client.chat.completions.create(**ask), client.chat.completions.create(**ask)
    texts = [c.message.content for c in a.choices]
    assert texts == [c.message.content for c in b.choices]  # seeded: reproducible
    assert len(set(texts)) == 3 and [c.index for c in a.choices] == [0, 1, 2]
    greedy = client.chat.completions.create(**chat("Tell me something.", max_tokens=20)).choices[0].message.content
    stop = greedy[4:7]
    cut = client.chat.completions.create(**chat("Tell me something.", max_tokens=20, stop=[stop, "never"]))
    assert cut.choices[0].message.content == greedy[:greedy.index(stop)] and cut.choices[0].finish_reason == "stop"
    many = client.completions.create(model="x", prompt=["one", "two words"], n=2, max_tokens=4, temperature=0)
    assert [c.index for c in many.choices] == [0, 1, 2, 3] and many.choices[0].text == many.choices[1].text


async def _stream_texts(url, requests):
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
    async def one(req):
        text, reasons = "", []
        async for c in await client.chat.completions.create(**req, stream=True):
            text += c.choices[0].delta.content or ""
            reasons.append(c.choices[0].finish_reason)
        return text, reasons[-1]
    try: return await asyncio.gather(*(one(r) for r in requests))
    finally: await client.close()


def _concurrent_equals_sequential(url, engine, requests):
    before = engine.counts["largest_batch"]
    engine.counts["largest_batch"] = 0
    together = asyncio.run(asyncio.wait_for(_stream_texts(url, requests), TIMEOUT))
    batched = engine.counts["largest_batch"]
    alone = [asyncio.run(asyncio.wait_for(_stream_texts(url, [r]), TIMEOUT))[0] for r in requests]
    engine.counts["largest_batch"] = max(before, batched)
    assert all(reason == "length" for _, reason in together)  # complete streams, to the last chunk
    assert together == alone
    assert batched > 1  # they really shared batched steps


def test_eight_concurrent_streams(tiny_server):
    "Prompts of different lengths, left-padded into shared batches, inside the full-precision window."
    url, engine = tiny_server
    requests = [chat(f"Question {i}: " + "why? " * i, max_tokens=40 + 3 * i) for i in range(8)]
    _concurrent_equals_sequential(url, engine, requests)


def test_eight_concurrent_streams_quantized(tiny):
    "Equal-length prompts with a 32-token window and block: most of the history is quantized, batched or not."
    model, tok = tiny
    make = lambda: TinyKVCache.for_model(model, "balanced", residual_length=32, block_size=32)
    engine = Engine(model, tok, make, max_batch=8, max_new_tokens_limit=200)
    with serve(make_app(engine, "tiny-llama")) as url:
        requests = [chat(f"Question {i}: " + "abcdefgh"[i] * 40, max_tokens=120) for i in range(8)]
        _concurrent_equals_sequential(url, engine, requests)
        assert engine.counts["completion_tokens"] == 16 * 120


def test_disconnect_frees_slot(tiny_server):
    url, engine = tiny_server
    client = client_for(url)
    start = engine.counts["completion_tokens"]
    stream = client.chat.completions.create(**chat("Go on and on.", max_tokens=3000), stream=True)
    it = iter(stream)
    for _ in range(3): next(it)
    metrics = httpx.get(url + "/metrics").json()
    assert metrics["active_sequences"] == 1 and metrics["kv_held_bytes"] > 0
    stream.close()
    assert wait_for(lambda: httpx.get(url + "/metrics").json()["active_sequences"] == 0)
    metrics = httpx.get(url + "/metrics").json()
    assert metrics["kv_held_bytes"] == 0 and metrics["free_slots"] == metrics["max_batch"]
    assert engine.counts["completion_tokens"] - start < 3000  # it stopped generating
    assert client.chat.completions.create(**chat("Still there?", max_tokens=5)).usage.completion_tokens == 5


def test_queue_full_429(tiny):
    model, tok = tiny
    engine = Engine(model, tok, max_batch=1, max_queue=1, max_new_tokens_limit=3000)
    with serve(make_app(engine, "tiny-llama")) as url:
        client = client_for(url)
        running = client.chat.completions.create(**chat("one", max_tokens=3000), stream=True)
        next(iter(running))
        waiting = client.chat.completions.create(**chat("two", max_tokens=3000), stream=True)
        assert wait_for(lambda: httpx.get(url + "/metrics").json()["queue_depth"] == 1)
        with pytest.raises(openai.RateLimitError, match="busy") as e:
            client.chat.completions.create(**chat("three", max_tokens=5))
        assert e.value.body["type"] == "rate_limit_error"
        running.close(); waiting.close()
        assert wait_for(lambda: httpx.get(url + "/metrics").json()["active_sequences"] == 0)
        assert httpx.get(url + "/metrics").json()["rejected"] == 1


BAD = [  # (body, the param the error must name, or None)
    ({"model": "x"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "user"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000}, "max_tokens"),  # prompt + 4000 > 4096
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 9}, "n"),  # more than --max-batch
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": 5}, "stop"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "x" * 5000}]}, "messages"),  # longer than the 4096-token context
]


@pytest.mark.parametrize("body,param", BAD)
def test_bad_chat_requests(tiny_server, body, param):
    url, _ = tiny_server
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=TIMEOUT)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] is not None and err["param"].startswith(param), err


def test_bad_requests_other(tiny_server):
    url, _ = tiny_server
    post = lambda path, **kw: httpx.post(url + path, timeout=TIMEOUT, **kw)
    for body in (b"{not json", b"", b"[1, 2]", b"null", "{\"messages\": [{\"role\": \"user\", \"content\": \"\\ud800\"}]}".encode()):
        r = post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500 and "error" in r.json(), (body, r.text)
    for prompt in ("", [], [[]], [10**6], [-1], "x" * 5000, [1.5]):
        r = post("/v1/completions", json={"prompt": prompt})
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("prompt"), (prompt, r.text)
    assert httpx.get(url + "/v1/nothing").status_code == 404
    assert httpx.get(url + "/v1/chat/completions").status_code == 405
    assert httpx.get(url + "/v1/models/gpt-4").json()["error"]["code"] == "model_not_found"
    # fields OpenAI clients send and we do not use are accepted and ignored
    ok = post("/v1/chat/completions", json=chat("hi", max_tokens=3, user="me", presence_penalty=0.2, logprobs=False,
                                                 tools=[], response_format={"type": "text"}))
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_failure_in_one_request_spares_the_others(tiny, monkeypatch):
    "A request whose sampling fails gets a 500 in OpenAI's shape; the request batched with it finishes normally."
    model, tok = tiny
    import tiny_turboquant.server as srv
    real = srv.sample_token
    def flaky(logits, temperature, top_p, generator):
        if temperature == 0.5: raise RuntimeError("injected failure")
        return real(logits, temperature, top_p, generator)
    monkeypatch.setattr(srv, "sample_token", flaky)
    engine = Engine(model, tok, max_batch=4, max_new_tokens_limit=100, batch_wait_s=0.2)
    with serve(make_app(engine, "tiny-llama")) as url:
        client = client_for(url)
        results = {}
        def ask(name, temperature):
            try: results[name] = client.chat.completions.create(**{**chat("hi", max_tokens=50), "temperature": temperature})
            except openai.APIStatusError as e: results[name] = e
        threads = [threading.Thread(target=ask, args=a) for a in (("bad", 0.5), ("good", 0))]
        for t in threads: t.start()
        for t in threads: t.join(TIMEOUT)
        assert engine.counts["largest_batch"] == 2
        assert isinstance(results["bad"], openai.InternalServerError) and "injected failure" in results["bad"].message
        alone = client.chat.completions.create(**chat("hi", max_tokens=50))
        assert results["good"].choices[0].message.content == alone.choices[0].message.content
        assert results["good"].usage.completion_tokens == alone.usage.completion_tokens
        stream = client.chat.completions.create(**{**chat("hi", max_tokens=5), "temperature": 0.5}, stream=True)
        with pytest.raises(openai.APIError, match="injected failure"): list(stream)
        assert client.chat.completions.create(**chat("again", max_tokens=5)).usage.completion_tokens == 5
        assert httpx.get(url + "/health").status_code == 200


def test_fuzz_openapi_schema(tiny):
    "Schemathesis generates valid and invalid requests from the server's own OpenAPI schema: no answer is a 5xx."
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    model, tok = tiny
    engine = Engine(model, tok, max_batch=16, max_queue=64, max_new_tokens_limit=8)
    with serve(make_app(engine, "tiny-llama")) as url:
        schema = schemathesis.openapi.from_url(url + "/openapi.json")
        seen = {}
        for result in schema.get_all_operations():
            op = result.ok()
            for mode in schemathesis.GenerationMode:
                @given(case=op.as_strategy(generation_mode=mode))
                @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
                          suppress_health_check=list(HealthCheck))
                def check(case):
                    r = case.call(timeout=60)
                    seen[r.status_code] = seen.get(r.status_code, 0) + 1
                    assert r.status_code < 500, (case.method, case.path, case.body, r.status_code, r.text[:500])
                try: check()
                except Unsatisfiable:  # no invalid input exists without a body: GET /health, GET /v1/models/{any string}
                    assert mode == schemathesis.GenerationMode.NEGATIVE and not op.body
        assert 200 in seen and 400 in seen, seen
        assert httpx.get(url + "/metrics").json()["failed"] == 0


def test_smollm2_concurrent_and_compressed():
    "The embedded default model: concurrent greedy streams equal one-at-a-time answers, and the cache compresses."
    model, tok = load_model()
    engine = Engine(model, tok, cache_factory(model, "safe"), max_batch=4, max_new_tokens_limit=64)
    with serve(make_app(engine, "SmolLM2-135M-Instruct")) as url:
        questions = ["What is the capital of France?", "Name three colours.",
                     "Summarize this:\n\n" + sample_text(4000)]
        requests = [dict(model="smol", messages=[{"role": "user", "content": q}], max_tokens=24, temperature=0)
                    for q in questions]
        together = asyncio.run(asyncio.wait_for(_stream_texts(url, requests), 600))
        alone = [client_for(url).chat.completions.create(**r).choices[0].message.content for r in requests]
        assert [t for t, _ in together] == alone
        assert "Paris" in alone[0]
        assert engine.counts["largest_batch"] >= 2
        # the long prompt's history is mostly quantized while it decodes: read the memory from /metrics mid-stream
        stream = client_for(url).chat.completions.create(**{**requests[2], "max_tokens": 64}, stream=True)
        it = iter(stream); next(it); next(it)
        m = httpx.get(url + "/metrics").json()
        stream.close()
        assert m["active_sequences"] == 1 and m["kv_ratio"] > 2.5, m


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_command_serves_default_model():
    "`tiny-turboquant-server` with no --model serves the embedded SmolLM2, offline."
    port = _free_port()
    cmd = [sys.executable, "-c", "from tiny_turboquant.server import main; main()", "--port", str(port),
           "--compression", "balanced", "--max-batch", "2", "--threads", "1", "--max-new-tokens-limit", "8"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        def up():
            try: return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.HTTPError: return False
        assert wait_for(up, timeout=180), proc.stdout.read1().decode() if proc.poll() is not None else "no answer"
        client = client_for(url)
        assert [m.id for m in client.models.list()] == ["SmolLM2-135M-Instruct"]
        r = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=8)
        assert r.usage.completion_tokens <= 8
        with pytest.raises(openai.BadRequestError, match="limit of 8"):
            client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=9)
    finally:
        proc.terminate()
        try: proc.wait(30)
        except subprocess.TimeoutExpired: proc.kill(); proc.wait(10)
