"""The OpenAI-compatible server, tested over real HTTP on 127.0.0.1 with the official `openai`
client (and httpx for what the client hides: status codes, raw SSE, disconnects).

One server over stories260K serves the module (started in a thread by `jaxinfer.server.start`);
the SIGTERM test runs `python -m jaxinfer serve` as a subprocess. References come from a second
Engine with the same settings: greedy decoding is deterministic, so HTTP must give exactly the
engine's tokens.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra (fastapi, uvicorn)")
openai = pytest.importorskip("openai", reason="the server is tested with the official openai client")
httpx = pytest.importorskip("httpx")

import jaxinfer  # noqa: E402
from jaxinfer import server  # noqa: E402
from jaxinfer.sampling import SamplingParams  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
NAME = "stories260K"
ENGINE = dict(max_slots=16, page_size=16, num_pages=512, max_seq_len=256, max_logprobs=20)
PROMPTS = ["Once upon a time", "The little dog", "Lily and Ben went to the park", "One day"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYS] {{ m['content'] }}\n"
                 "{% elif m['role'] == 'user' %}User: {{ m['content'] | trim }}\n{% else %}Assistant: "
                 "{{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}Assistant:{% endif %}")


@pytest.fixture(scope="module")
def checkpoint(assets_dir, tmp_path_factory) -> Path:
    """stories260K with a chat template added (tokenizer_config.json), in a temporary directory."""
    src, dst = assets_dir / "stories260K", tmp_path_factory.mktemp("chat_ckpt")
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        os.symlink(src / f, dst / f)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    (dst / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": CHAT_TEMPLATE}))
    return dst


@pytest.fixture(scope="module")
def model(checkpoint):
    return jaxinfer.load_model(checkpoint)


@pytest.fixture(scope="module")
def tok(checkpoint):
    return jaxinfer.load_tokenizer(checkpoint)


@pytest.fixture(scope="module")
def reference(model, tok):
    engine = jaxinfer.Engine(model, tokenizer=tok, **ENGINE)
    return lambda prompts, **kw: engine.generate(prompts, SamplingParams(**{"temperature": 0.0, **kw}))


@pytest.fixture(scope="module")
def srv(model, tok, checkpoint):
    engine = jaxinfer.Engine(model, tokenizer=tok, **ENGINE)
    server.serve.warm_up(engine)
    running = server.start(engine, NAME, tok, server.load_chat_template(checkpoint))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def wait_idle(srv, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not srv.engine_thread._handles and metric(srv.url, "jaxinfer_num_requests_running") == 0 \
                and metric(srv.url, "jaxinfer_kv_pages_used") == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"not idle after {timeout}s: {httpx.get(srv.url + '/metrics').text[:600]}")


# ----------------------------------------------------------------------------- completions
def test_greedy_completions_equal_the_engine(client, reference):
    """Text prompts, token-id prompts and a list of prompts: text, finish reason and usage."""
    refs = reference(PROMPTS, max_tokens=24)
    for p, ref in zip(PROMPTS, refs):
        out = client.completions.create(model=NAME, prompt=p, max_tokens=24, temperature=0)
        assert out.choices[0].text == ref.text and out.choices[0].finish_reason == ref.finish_reason
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ref.prompt_token_ids), len(ref.token_ids))
        assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == NAME
    ids = [r.prompt_token_ids for r in refs]
    many = client.completions.create(model=NAME, prompt=ids, max_tokens=24, temperature=0)
    assert [c.text for c in sorted(many.choices, key=lambda c: c.index)] == [r.text for r in refs]
    assert many.usage.completion_tokens == sum(len(r.token_ids) for r in refs)


def test_stream_concatenates_to_the_full_text_and_reports_usage(client, reference):
    ref = reference(PROMPTS[:1], max_tokens=40)[0]
    chunks = list(client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=40, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert len([c for c in chunks if c.choices]) > 1  # it really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)


def test_raw_sse_ends_with_done(srv):
    with httpx.stream("POST", srv.url + "/v1/completions", json={"model": NAME, "prompt": "Hi", "max_tokens": 5,
                                                                 "stream": True}, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"


def test_n_returns_that_many_choices_and_sample_0_is_the_n1_output(client):
    kw = dict(model=NAME, prompt=PROMPTS[1], max_tokens=12, temperature=1.0, seed=7)
    three = client.completions.create(n=3, **kw)
    one = client.completions.create(n=1, **kw)
    assert sorted(c.index for c in three.choices) == [0, 1, 2]
    by_index = {c.index: c.text for c in three.choices}
    assert by_index[0] == one.choices[0].text
    assert len(set(by_index.values())) > 1, "three samples at temperature 1 should not all agree"


def test_logprobs_are_the_engines(client, reference, tok):
    ref = reference([PROMPTS[2]], max_tokens=10, logprobs=3)[0]
    out = client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=10, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert lp.tokens == [tok.decode([t], skip_special_tokens=False) for t in ref.token_ids]
    # Same model, same batch-size bucket: the numbers agree to float32 rounding (1e-5 absolute
    # allows for a different batch composition in the server's step).
    np.testing.assert_allclose(lp.token_logprobs, [d[t] for t, d in zip(ref.token_ids, ref.logprobs)], atol=1e-5)
    assert all(len(top) >= 3 for top in lp.top_logprobs)


def test_echo_returns_prompt_and_its_logprobs(client, reference):
    ref = reference([PROMPTS[0]], max_tokens=5, logprobs=1, prompt_logprobs=1)[0]
    out = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=5, temperature=0, echo=True, logprobs=1)
    assert out.choices[0].text.endswith(ref.text) and out.choices[0].text.startswith(PROMPTS[0])
    lp = out.choices[0].logprobs.token_logprobs
    assert lp[0] is None and len(lp) == len(ref.prompt_token_ids) + len(ref.token_ids)
    np.testing.assert_allclose(lp[1:len(ref.prompt_token_ids)],
                               [d[t] for t, d in zip(ref.prompt_token_ids[1:], ref.prompt_logprobs[1:])], atol=1e-5)


# ----------------------------------------------------------------------------- chat
def test_chat_renders_like_transformers_and_completes_like_the_engine(client, checkpoint, tok, reference):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(checkpoint)
    messages = [{"role": "system", "content": "You tell short stories."},
                {"role": "user", "content": "  Tell me about a cat.  "},
                {"role": "assistant", "content": "Once there was a cat."},
                {"role": "user", "content": "And a dog?"}]
    template = server.load_chat_template(checkpoint)
    text = template.render(messages)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    hf_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    hf_ids = list(hf_ids["input_ids"] if isinstance(hf_ids, dict) or hasattr(hf_ids, "keys") else hf_ids)
    assert tok.encode(text, add_special_tokens=False) == hf_ids
    ref = reference([hf_ids], max_tokens=20)[0]
    out = client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=20, temperature=0)
    assert out.choices[0].message.content == ref.text and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(hf_ids) and out.object == "chat.completion"
    stream = client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=20, temperature=0,
                                            stream=True, logprobs=True, top_logprobs=2)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    lps = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(lps) == len(ref.token_ids) and all(len(e.top_logprobs) == 2 for e in lps)


def test_chat_without_a_template_is_a_clear_400(model, tok):
    engine = jaxinfer.Engine(model, tokenizer=tok, **{**ENGINE, "max_slots": 2})
    running = server.start(engine, NAME, tok, None)
    try:
        r = httpx.post(running.url + "/v1/chat/completions", json={"model": NAME, "messages": [
            {"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
    finally:
        running.stop()


# ----------------------------------------------------------------------------- concurrency
def test_64_concurrent_streams_are_batched_and_correct(srv, reference):
    prompts = [f"{PROMPTS[i % 4]} {'and ' * (i % 5)}" .strip() for i in range(64)]
    lengths = [8 + (i * 7) % 25 for i in range(64)]
    refs = {}
    for p, n in zip(prompts, lengths):
        refs.setdefault((p, n), reference([p], max_tokens=n)[0].text)
    first_step = len(srv.engine_thread.steps)

    async def one(c, p, n):
        text = ""
        async for chunk in await c.completions.create(model=NAME, prompt=p, max_tokens=n, temperature=0, stream=True):
            text += chunk.choices[0].text
        return text

    async def main():
        async with openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=300) as c:
            return await asyncio.gather(*(one(c, p, n) for p, n in zip(prompts, lengths)))
    texts = asyncio.run(main())
    assert texts == [refs[(p, n)] for p, n in zip(prompts, lengths)]
    steps = srv.engine_thread.steps[first_step:]
    assert max(s.running for s in steps) > 1, "the requests were not batched together"
    # the slots in use when a step starts: with 64 requests queued, nearly every slot
    assert max(s.running for s in steps) >= ENGINE["max_slots"] - 2
    wait_idle(srv)


# ----------------------------------------------------------------------------- bad requests
def _body(**kw):
    return {"model": NAME, "prompt": "Once", "max_tokens": 4, **kw}


LONG = "Once upon a time " * 200
BAD = [
    # (what, path, raw body or json, status, message regex, param)
    ("not json", "/v1/completions", b"{not json", 400, r"parse the JSON", None),
    ("json array body", "/v1/completions", [1, 2], 400, r"body", None),
    ("missing prompt", "/v1/completions", {"model": NAME}, 400, r"Missing required parameter: prompt", "prompt"),
    ("missing model", "/v1/completions", {"prompt": "x"}, 400, r"model", "model"),
    ("string temperature", "/v1/completions", _body(temperature="hot"), 400, r"temperature", "temperature"),
    ("bool max_tokens", "/v1/completions", _body(max_tokens=True), 400, r"max_tokens", "max_tokens"),
    ("negative temperature", "/v1/completions", _body(temperature=-1), 400, r"temperature", "temperature"),
    ("top_p above 1", "/v1/completions", _body(top_p=1.5), 400, r"top_p", "top_p"),
    ("zero max_tokens", "/v1/completions", _body(max_tokens=0), 400, r"max_tokens", "max_tokens"),
    ("n zero", "/v1/completions", _body(n=0), 400, r"\bn\b", "n"),
    ("penalty out of range", "/v1/completions", _body(presence_penalty=3), 400, r"presence_penalty", "presence_penalty"),
    ("too many logprobs", "/v1/completions", _body(logprobs=50), 400, r"logprobs", "logprobs"),
    ("unknown field", "/v1/completions", _body(frobnicate=1), 400, r"Unrecognized request argument.*frobnicate",
     "frobnicate"),
    ("empty prompt", "/v1/completions", _body(prompt=""), 400, r"prompt is empty", "prompt"),
    ("empty prompt list", "/v1/completions", _body(prompt=[]), 400, r"prompt is empty", "prompt"),
    ("token id out of vocab", "/v1/completions", _body(prompt=[1, 10 ** 6]), 400, r"vocab", None),
    ("prompt too long", "/v1/completions", _body(prompt=LONG), 400, r"max_seq_len", None),
    ("unknown model", "/v1/completions", _body(model="gpt-5"), 404, r"gpt-5", "model"),
    ("logit_bias", "/v1/completions", _body(logit_bias={"5": 1.0}), 400, r"logit_bias.*not supported", "logit_bias"),
    ("bad stop type", "/v1/completions", _body(stop=5), 400, r"stop", "stop"),
    ("chat no messages", "/v1/chat/completions", {"model": NAME, "messages": []}, 400, r"messages", "messages"),
    ("chat bad role", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     r"role", "messages"),
    ("chat top_logprobs without logprobs", "/v1/chat/completions",
     {"model": NAME, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, r"top_logprobs",
     "top_logprobs"),
    ("chat tools", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}],
                                            "tools": [{"type": "function"}]}, 400, r"tools.*not supported", "tools"),
    ("unknown route", "/v1/embeddings", _body(), 404, r"Not Found", None),
    ("wrong method", "/v1/completions?x", None, 405, r"Method Not Allowed", None),
]


@pytest.mark.parametrize("what,path,body,status,message,param", BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_openai_error_and_server_keeps_serving(srv, what, path, body, status, message, param):
    if body is None:
        r = httpx.get(srv.url + path)
    elif isinstance(body, bytes):
        r = httpx.post(srv.url + path, content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(srv.url + path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and re.search(message, err["message"]), err
    if param is not None:
        assert err["param"] == param, err
    ok = httpx.post(srv.url + "/v1/completions", json=_body(temperature=0))
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"]


def test_models_health_metrics(srv):
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
    assert [m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]] == [NAME]
    text = httpx.get(srv.url + "/metrics").text
    for name in ("jaxinfer_num_requests_running", "jaxinfer_num_requests_waiting", "jaxinfer_kv_pages_used",
                 "jaxinfer_kv_pages_cached", "jaxinfer_prefix_cache_hit_rate", "jaxinfer_preemptions_total",
                 "jaxinfer_prompt_tokens_total", "jaxinfer_generation_tokens_total",
                 "jaxinfer_time_to_first_token_seconds_bucket", "jaxinfer_inter_token_latency_seconds_bucket"):
        assert re.search(rf"^{name}[ {{]", text, re.M), name
    before = metric(srv.url, "jaxinfer_generation_tokens_total")
    httpx.post(srv.url + "/v1/completions", json=_body(max_tokens=6, temperature=0, ignore_eos=True))
    assert metric(srv.url, "jaxinfer_generation_tokens_total") == before + 6
    assert metric(srv.url, "jaxinfer_time_to_first_token_seconds_count") > 0


# ----------------------------------------------------------------------------- faults
def test_disconnect_mid_stream_aborts_and_frees_pages(srv):
    body = _body(prompt=PROMPTS[0], max_tokens=200, ignore_eos=True, stream=True, temperature=0)
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(2):
            next(lines)
    # the client is gone after 2 events of 200 tokens; the server must notice and abort
    wait_idle(srv)
    aborted = metric(srv.url, 'jaxinfer_requests_total{finish_reason="abort"}'.replace("{", r"\{").replace("}", r"\}"))
    assert aborted >= 1


def test_failed_step_is_a_500_for_its_requests_and_the_others_continue(srv, monkeypatch):
    engine = srv.engine_thread.engine
    real, calls = engine.step, []

    def flaky():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected device fault")
        return real()
    monkeypatch.setattr(engine, "step", flaky)
    r = httpx.post(srv.url + "/v1/completions", json=_body(max_tokens=40, ignore_eos=True), timeout=60)
    assert r.status_code == 500 and "injected device fault" in r.json()["error"]["message"]
    ok = httpx.post(srv.url + "/v1/completions", json=_body(temperature=0), timeout=60)
    assert ok.status_code == 200
    wait_idle(srv)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sigterm_during_a_stream_ends_the_stream_and_the_process(tmp_path):
    port = server.serve.free_port()
    env = {**os.environ, "JAXINFER_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "jaxinfer", "serve", "--port", str(port), "--max-slots", "2",
                             "--num-pages", "64", "--max-seq-len", "256", "--log-level", "warning"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server not ready"
            time.sleep(0.2)
        name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        events = []
        with httpx.stream("POST", url + "/v1/completions", timeout=30, json={
                "model": name, "prompt": [1, 2, 3], "max_tokens": 250, "ignore_eos": True, "stream": True}) as r:
            for line in r.iter_lines():
                if line:
                    events.append(line)
                if len(events) == 2:
                    t = time.monotonic()
                    proc.send_signal(signal.SIGTERM)
        assert events[-1] == "data: [DONE]" and time.monotonic() - t < 10, events[-3:]
        finishes = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-1]]
        assert finishes[-1] == "abort"
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)


def test_readme_server_blocks_run_against_a_live_server(srv, tmp_path):
    """The README's curl and openai-client blocks, with localhost:8000 pointed at this server
    (which serves stories260K under the README's model name)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## HTTP server"):text.index("## Errors")]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)
    port = srv.url.rsplit(":", 1)[1]
    ran = 0
    for lang, code in blocks:
        if "localhost:8000" not in code:
            continue
        code = code.replace("localhost:8000", f"127.0.0.1:{port}")
        cmd = [sys.executable, "-c", code] if lang == "python" else ["bash", "-c", code]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and res.stdout.strip(), f"README block failed:\n{code}\n{res.stderr[-2000:]}"
        if lang == "bash":
            assert json.loads(res.stdout)["choices"][0]["text"]
        ran += 1
    assert ran == 2
