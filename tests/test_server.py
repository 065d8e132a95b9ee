"""The OpenAI-compatible server, live on Ray Serve: the official openai client against real HTTP.

Two applications from `raymoe config`-built configs: the main one with its experts as Ray actors behind
gRPC (two shards of two replicas), and a local-experts one whose tokenizer has no chat template and
which requires an API key.
"""

import asyncio
import json
import shutil
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch
from hf_reference import build_checkpoint

from cli.main import parse_settings
from cluster.deploy import deploy, http_port
from cluster.serve_config import serve_config

MODEL = "tiny"
KEY = "sk-test-raymoe"
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '\\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
CORPUS = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(200)] + [
    "import os\nimport sys\n", "class Point:\n    def __init__(self, x, y):\n        self.x = x\n",
    "for i in range(10):\n    print(i)\n", "hello world, héllo wörld \u00e9\u00e8\n"]
PROMPTS = ["def f(x):", "import os", "class Point:", "for i in range(3):"]


def train_tokenizer(path, vocab_size: int) -> None:
    """A byte-level BPE over a little code, as tokenizer.json; ids 0-2 are <unk>, <s>, </s> like Mixtral's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    assert tok.get_vocab_size() <= vocab_size
    tok.save(str(path / "tokenizer.json"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(with a chat template, without one): one random checkpoint, two tokenizer configs."""
    chat = tmp_path_factory.mktemp("chat-model")
    build_checkpoint(chat, vocab_size=320, seed=3)
    train_tokenizer(chat, 320)
    (chat / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}))
    plain = tmp_path_factory.mktemp("plain-model")
    for f in chat.iterdir():
        shutil.copy(f, plain / f.name)
    (plain / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return chat, plain


def config(*argv: str) -> dict:
    return serve_config(*parse_settings(list(argv)))


@pytest.fixture(scope="module")
def server(ray_session, checkpoints):
    """Base URLs of the two applications, deployed as `raymoe serve` deploys them."""
    from ray import serve

    chat, plain = checkpoints
    main = config("--model", str(chat), "--served-model-name", MODEL, "--expert-backend", "ray",
                  "--num-shards", "2", "--replicas-per-shard", "2", "--expert-num-cpus", "0.25",
                  "--router-num-cpus", "0.5")
    keyed = config("--model", str(plain), "--served-model-name", MODEL, "--expert-backend", "local",
                   "--router-num-cpus", "0.5")
    keyed["applications"][0].update(name="raymoe-keyed", route_prefix="/keyed")
    names = deploy(main) + deploy(keyed, api_key=KEY)
    base = f"http://127.0.0.1:{http_port()}"
    yield {"main": base, "keyed": f"{base}/keyed", "model": chat}
    for name in names:
        serve.delete(name)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["main"] + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def llm(checkpoints):
    from router import LLM

    llm = LLM(checkpoints[0], expert_backend="local")
    yield llm
    llm.shutdown()


def post(url: str, body, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    return call(req)


def call(req) -> tuple[int, dict | str]:
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            raw = r.read().decode()
            return r.status, json.loads(raw) if raw else ""
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())


GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


def test_health_and_models(server, client):
    assert call(urllib.request.Request(server["main"] + "/health"))[0] == 200
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]


def test_completion(client, llm):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, **GREEDY)
    (choice,) = r.choices
    assert r.object == "text_completion" and r.model == MODEL and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == len(llm.tokenizer.encode(PROMPTS[0]))
    from router import SamplingParams

    ref = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    assert choice.text == ref.outputs[0].text


def test_prompt_forms(client):
    """A list of strings gives one choice each; token ids are a prompt too."""
    r = client.completions.create(model=MODEL, prompt=PROMPTS[:3], max_tokens=5, **GREEDY)
    assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 15
    ids = client.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=4, logprobs=0, **GREEDY)
    assert len(ids.choices[0].logprobs.tokens) == 4


@pytest.mark.parametrize("stop", [False, True])
def test_stream_equals_non_stream(client, stop):
    kw = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=40, logprobs=1, **GREEDY)
    full = client.completions.create(**kw).choices[0]
    if stop:  # a stop string from the middle of the greedy output cuts both the same way
        kw["stop"] = [full.text[len(full.text) // 2:][:3]]
        full = client.completions.create(**kw).choices[0]
        assert full.finish_reason == "stop"
    chunks = list(client.completions.create(stream=True, **kw))
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].text for c in chunks)
    tokens = [t for c in chunks for t in c.choices[0].logprobs.tokens]
    assert text == full.text and tokens == full.logprobs.tokens
    assert chunks[-1].choices[0].finish_reason == full.finish_reason


def test_stream_done_and_usage(server):
    body = {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 6, "stream": True, "temperature": 0,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(server["main"] + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.read().decode().splitlines() if line]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_echo_logprobs_equal_llm(client, llm, max_tokens):
    """lm-evaluation-harness's loglikelihood request: echo the prompt with its log-probs."""
    prompt = "def f(x):\n    return x * 7 + 49\n"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, echo=True, logprobs=2,
                                  **GREEDY).choices[0]
    ids = llm.tokenizer.encode(prompt)
    lp = r.logprobs
    assert r.text.startswith(prompt) and len(lp.tokens) == len(ids) + max_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = llm.logprobs([ids])[0]  # (len, V): row t predicts token t + 1
    want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:len(ids)]), want, atol=1e-4, rtol=0)
    assert all(len(t) >= 2 for t in lp.top_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_32_concurrent_requests(server, llm):
    """32 clients at once share the engine's batch; each gets exactly the offline greedy answer."""
    from router import SamplingParams

    prompts = [f"{PROMPTS[i % 4]} {i}" for i in range(32)]
    aclient = openai.AsyncOpenAI(base_url=server["main"] + "/v1", api_key="unused", max_retries=0,
                                 timeout=120)

    async def one(p):
        return await aclient.completions.create(model=MODEL, prompt=p, max_tokens=16, **GREEDY)

    async def all_of_them():
        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await aclient.close()

    outs = asyncio.run(all_of_them())
    ref = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    assert [o.choices[0].text for o in outs] == [r.outputs[0].text for r in ref]
    assert all(o.usage.completion_tokens == 16 for o in outs)


def test_seeded_sampling_repeats(client):
    kw = dict(model=MODEL, prompt=PROMPTS[3], max_tokens=16, temperature=1.0, top_p=0.9, seed=7,
              extra_body={"top_k": 50})
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_a_vanishing_temperature_is_greedy_and_hurts_no_other_request(client):
    """1e-40 passes validation (>= 0); dividing logits by it gives inf, whose softmax is NaN: as in vLLM, a
    temperature under 1e-5 decodes greedily, and a request sampled beside it in the batch is unaffected."""
    async def both():
        aclient = openai.AsyncOpenAI(base_url=client.base_url, api_key="x")
        try:
            return await asyncio.gather(
                aclient.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=1e-40,
                                         extra_body={"ignore_eos": True}),
                aclient.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=1.0, seed=3))
        finally:
            await aclient.close()

    tiny, other = asyncio.run(both())
    greedy = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, **GREEDY)
    assert tiny.choices[0].text == greedy.choices[0].text
    assert other.usage.completion_tokens > 0


def test_chat(client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def f(x):"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, **GREEDY)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens == 10
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, stream=True,
                                                 **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    # The template's text, sent as a plain prompt, continues the same way.
    rendered = "<s><|system|>be brief\n<|user|>def f(x):\n<|assistant|>"
    plain = client.completions.create(model=MODEL, prompt=rendered, max_tokens=10, **GREEDY)
    assert plain.choices[0].text == r.choices[0].message.content


BAD_COMPLETIONS = [
    ({"prompt": "x", "temperature": "hot"}, 400),
    ({"prompt": "x", "temperature": -1}, 400),
    ({"prompt": "x", "top_p": 0}, 400),
    ({"prompt": "x", "top_k": -2}, 400),
    ({"prompt": "x", "max_tokens": -1}, 400),
    ({"prompt": "x", "max_tokens": "many"}, 400),
    ({"prompt": "x", "logprobs": 1000}, 400),
    ({"prompt": "x", "n": 2}, 400),
    ({"prompt": "x", "stop": [""]}, 400),
    ({"prompt": "x", "seed": -1}, 400),
    ({"prompt": "x", "best_of": 2}, 400),
    ({"prompt": "x", "logit_bias": {"5": 10}}, 400),
    ({"prompt": "x", "presence_penalty": 0.5}, 400),
    ({}, 400),
    ({"prompt": ""}, 400),
    ({"prompt": []}, 400),
    ({"prompt": [[1, 2], "mixed"]}, 400),
    ({"prompt": [10**6]}, 400),
    ({"prompt": [-1]}, 400),
    ({"prompt": [[3, 4], [2**70]]}, 400),
    ({"prompt": "x", "max_tokens": 100000}, 400),
    ({"prompt": [5] * 600, "max_tokens": 1}, 400),
    ({"prompt": "x", "model": "gpt-4"}, 404),
]


@pytest.mark.parametrize("body,status", BAD_COMPLETIONS, ids=lambda v: json.dumps(v)[:40] if v else str(v))
def test_bad_completion_requests(server, body, status):
    code, err = post(server["main"] + "/v1/completions", {"model": MODEL, **body})
    assert code == status
    assert err["object"] == "error" and err["code"] == status and err["message"]


BAD_CHAT = [
    ({"messages": []}, 400),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 50, "logprobs": True}, 400),
    ({"messages": [{"role": "user", "content": "hi " * 400}], "max_tokens": 200}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "nope"}, 404),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}]},
     400),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}, 400),
]


@pytest.mark.parametrize("body,status", BAD_CHAT, ids=lambda v: json.dumps(v)[:40] if v else str(v))
def test_bad_chat_requests(server, body, status):
    code, err = post(server["main"] + "/v1/chat/completions", {"model": MODEL, **body})
    assert code == status and err["object"] == "error" and err["message"]


def test_unsupported_parameters_are_named_and_neutral_values_pass(server):
    code, err = post(server["main"] + "/v1/completions", {"model": MODEL, "prompt": "x", "best_of": 3,
                                                           "logit_bias": {"1": 5}})
    assert code == 400 and "best_of" in err["message"] and "logit_bias" in err["message"]
    neutral = {"best_of": 1, "logit_bias": {}, "presence_penalty": 0.0, "frequency_penalty": 0, "user": "u",
               "ignore_eos": True}
    code, out = post(server["main"] + "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2, **neutral})
    assert code == 200 and out["usage"]["completion_tokens"] == 2


def test_malformed_bodies_and_unknown_routes(server):
    assert post(server["main"] + "/v1/completions", b"{not json")[0] == 400
    assert post(server["main"] + "/v1/completions", b"[1, 2]")[0] == 400
    assert call(urllib.request.Request(server["main"] + "/v1/nothing"))[0] == 404


def test_openai_client_errors(client, server):
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=100000)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    plain = openai.OpenAI(base_url=server["keyed"] + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="chat template"):
        plain.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert plain.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens <= 2


def test_api_key(server):
    url = server["keyed"] + "/v1/completions"
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    assert post(url, body)[0] == 401
    assert post(url, body, {"Authorization": "Bearer wrong"})[0] == 401
    assert post(url, {"temperature": "hot"}, {"Authorization": "Bearer wrong"})[0] == 401  # before validation
    assert post(url, body, {"Authorization": f"Bearer {KEY}"})[0] == 200
    assert call(urllib.request.Request(server["keyed"] + "/health"))[0] == 200  # health stays open
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["keyed"] + "/v1", api_key="wrong", max_retries=0).models.list()


def test_metrics(server, client, ray_session):
    """raymoe's own metrics and Serve's reach Ray's Prometheus endpoint."""
    client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, **GREEDY)
    port = ray_session._private.worker.global_worker.node.metrics_export_port
    want = ["ray_raymoe_generation_tokens_total", "ray_raymoe_expert_tokens_total",
            "ray_raymoe_num_requests_running",
            "ray_raymoe_expert_batch_size_bucket", "ray_raymoe_generation_tokens_per_second",
            "ray_serve_num_http_requests_total"]
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        missing = [w for w in want if w not in text]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not missing, missing
    assert 'expert="0"' in text and 'layer="1"' in text


def test_request_survives_killed_expert_replica(server, client, ray_session):
    """Kill one replica of every expert shard while a stream is running: the request still completes,
    token for token the same as without the failure."""
    kw = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=400, **GREEDY)
    want = client.completions.create(**kw).choices[0].text
    replicas = [n for n in ray_session.util.list_named_actors(all_namespaces=True)
                if "SERVE_REPLICA" in n["name"] and "#ExpertShard-" in n["name"] and n["name"].startswith(
                    "SERVE_REPLICA::raymoe#")]
    victims = {}
    for r in sorted(replicas, key=lambda n: n["name"]):
        victims.setdefault(r["name"].split("#")[1], r)  # one per shard
    assert len(victims) == 2, replicas
    stream = client.completions.create(stream=True, **kw)
    text = [next(stream).choices[0].text]
    for v in victims.values():
        ray_session.kill(ray_session.get_actor(v["name"], namespace=v["namespace"]), no_restart=True)
    chunks = list(stream)
    text += [c.choices[0].text for c in chunks]
    assert "".join(text) == want and chunks[-1].choices[0].finish_reason == "length"


def test_async_engine_aborts_when_the_caller_goes_away(checkpoints):
    """A client that disconnects cancels its handler; the engine thread then drops its sequences."""
    from router import LLM, SamplingParams
    from server.async_engine import AsyncEngine, Submission

    llm = LLM(checkpoints[0], expert_backend="local")
    runner = AsyncEngine(llm.engine)
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)

    async def client():
        async with await runner.submit([Submission([5, 6, 7], params), Submission([8, 9], params)]) as stream:
            while True:
                await stream.next_batch()

    async def disconnect_after_first_tokens():
        task = asyncio.create_task(client())
        while llm.engine.num_generated_tokens < 4:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(disconnect_after_first_tokens())
    deadline = time.monotonic() + 30
    while llm.engine.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not llm.engine.has_unfinished() and llm.engine.num_generated_tokens < 2 * 400
    runner.close()
    assert not runner.alive


def test_async_engine_rejects_a_bad_request_whole(checkpoints):
    """One bad prompt of several: a ValueError, and none of them runs."""
    from router import LLM, SamplingParams
    from server.async_engine import AsyncEngine, Submission

    llm = LLM(checkpoints[0], expert_backend="local")
    runner = AsyncEngine(llm.engine)
    params = SamplingParams(max_tokens=4)

    async def submit():
        await runner.submit([Submission([5, 6], params), Submission([10**6], params)])

    with pytest.raises(ValueError, match="outside the vocabulary"):
        asyncio.run(submit())
    runner.close()
    assert not llm.engine.has_unfinished()


def test_a_router_answers_503_with_retry_after_until_its_experts_are_up(ray_session, checkpoints):
    """Experts that cannot be placed (more CPUs than the cluster has) keep the router starting: it answers
    at once, 503 with Retry-After, instead of holding requests until they time out."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from cluster.deploy import deployed_configs

    app = config("--model", str(checkpoints[0]), "--served-model-name", MODEL, "--expert-backend", "ray",
                 "--num-shards", "1", "--expert-num-cpus", "64", "--router-num-cpus", "0.25")["applications"][0]
    app.update(name="raymoe-starting", route_prefix="/starting",
               runtime_env={"env_vars": {"RAYMOE_DATA_PLANE_TOKEN": "starting-token"}})  # as apply() gives one
    apps = deployed_configs() | {app["name"]: app}
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": list(apps.values())}))
    try:
        deadline, seen = time.monotonic() + 90, []
        while time.monotonic() < deadline:
            req = urllib.request.Request(f"http://127.0.0.1:{http_port()}/starting/v1/models")
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    seen.append((r.status, None, None))
            except urllib.error.HTTPError as e:
                seen.append((e.code, e.headers.get("Retry-After"), e.read().decode()))
            if seen[-1][0] == 503:
                break
            time.sleep(0.2)
        status, retry_after, body = seen[-1]
        assert status == 503 and retry_after == "1" and "starting" in json.loads(body)["message"], seen
        assert {s for s, _, _ in seen} <= {404, 503}  # the route appears, then the router answers 503
    finally:
        serve.delete(app["name"])


def test_a_client_leaving_mid_stream_costs_one_log_line(server, ray_session):
    """The stream's sequence is aborted and the router's log says so in one line, with no traceback."""
    import glob
    import socket

    session = ray_session._private.worker._global_node.get_session_dir_path()
    host, port = server["main"].removeprefix("http://").split(":")
    body = json.dumps({"model": MODEL, "prompt": "def f(x):", "max_tokens": 300, "stream": True,
                       "ignore_eos": True}).encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
    deadline, lines = time.monotonic() + 30, []
    while time.monotonic() < deadline and not lines:
        time.sleep(0.5)
        logs = [open(f).read() for f in glob.glob(f"{session}/logs/worker-*.err")]
        router_logs = [t for t in logs if ":actor_name:ServeReplica:raymoe:Router" in t]
        lines = [ln for t in router_logs for ln in t.splitlines() if "closed before the end" in ln]
    assert lines
    assert not any("never retrieved" in t or "TaskCancelledError" in t for t in router_logs)
