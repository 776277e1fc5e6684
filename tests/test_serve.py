"""`python -m lmjax.serve`: the real server in a subprocess on the short stdlib run, spoken to with
OpenAI's own client and with raw HTTP (bad requests, a client that leaves mid-stream)."""

import concurrent.futures
import dataclasses
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from lmjax import generate, serve
from lmjax.data.chat_template import LmjaxTemplate
from lmjax.data.tokenizer import Tokenizer

ONE_DEVICE = "mesh.data=1"  # the short run trained on 8 emulated devices; the server has one


@dataclasses.dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    log: Path  # its stderr
    model: str

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)

    def stats(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/stats", timeout=10) as r:
            return json.load(r)

    def post(self, path: str, body: bytes) -> tuple[int, dict]:
        """Status and JSON body of a raw POST, errors included."""
        request = urllib.request.Request(
            f"{self.url}{path}", body, {"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)


@pytest.fixture(scope="module")
def server(short_run, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    argv = ["--workdir", str(short_run), "--port", "0", "--max-batch", "8", "--set", ONE_DEVICE]
    with log.open("w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "lmjax.serve", *argv], stderr=stderr)
    try:
        yield Server(_wait_until_serving(process, log), log, short_run.name)
    finally:
        process.terminate()  # uvicorn shuts down, then ends by the signal it was sent
        process.wait(timeout=30)
        assert "Traceback" not in log.read_text()


def _wait_until_serving(process: subprocess.Popen, log: Path) -> str:
    """The server's URL, once `/v1/models` answers there."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        line = next((ln for ln in log.read_text().splitlines() if ln.startswith("serving ")), None)
        if line:
            url = line.split(" at ")[1].split("/v1")[0]
            try:
                urllib.request.urlopen(f"{url}/v1/models", timeout=5).close()
                return url
            except OSError:
                pass
        time.sleep(0.2)
    raise TimeoutError(log.read_text())


@pytest.fixture(scope="module")
def template(short_run):
    return LmjaxTemplate(Tokenizer.load(short_run / "tokenizer.model"))


def test_the_model_is_the_run(server):
    assert [m.id for m in server.client().models.list().data] == [server.model]


# The short run's context is 32 tokens: the prompts are short.
ASK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort a list?"}]
HI = [{"role": "user", "content": "hi"}]


def test_chat_whole_and_streamed_give_the_same_greedy_reply(server, template):
    client = server.client()
    whole = client.chat.completions.create(model=server.model, messages=ASK, max_tokens=8, temperature=0)
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    usage = whole.usage
    assert usage.prompt_tokens == len(template.prompt(ASK))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    limit = min(8, 32 - usage.prompt_tokens + 1)  # what the context leaves
    assert limit == 8
    if choice.finish_reason == "length":
        assert usage.completion_tokens == limit
    else:
        assert usage.completion_tokens < limit

    chunks = list(
        client.chat.completions.create(
            model=server.model,
            messages=ASK,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.model_dump() == usage.model_dump()


def test_completions_equal_the_generator_greedy(server, short_run):
    prompt = "import os\n\ndef main("
    expected = generate.Generator.from_workdir(short_run).sample(prompt, max_tokens=10, temperature=0)[0]
    client = server.client()
    whole = client.completions.create(model=server.model, prompt=prompt, max_tokens=10, temperature=0)
    assert whole.choices[0].text == expected
    assert whole.usage.completion_tokens == (
        10
        if whole.choices[0].finish_reason == "length"
        else len(Tokenizer.load(short_run / "tokenizer.model").encode(expected))
    )
    stream = client.completions.create(
        model=server.model, prompt=prompt, max_tokens=10, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_a_stop_text_ends_the_reply_before_it(server):
    """The short run continues "impor" with newlines only: a stop text of two ends the reply at
    once, with nothing shown, streamed or not (the first newline is held back, then cut)."""
    client = server.client()
    settings = dict(model=server.model, prompt="impor", max_tokens=10, temperature=0, stop=["\n\n"])
    whole = client.completions.create(**settings)
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == ("", "stop")
    assert whole.usage.completion_tokens == 2
    unmet = client.completions.create(**{**settings, "stop": "zz"})
    assert (unmet.choices[0].text, unmet.choices[0].finish_reason) == ("\n" * 10, "length")
    chunks = list(client.completions.create(**settings, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == ""
    assert chunks[-1].choices[0].finish_reason == "stop"


def _all_at_once(ask, inputs: list) -> list:
    """`ask` of every input, each from its own thread, released together."""
    start = threading.Barrier(len(inputs))

    def ask_together(x):
        start.wait()
        return ask(x)

    with concurrent.futures.ThreadPoolExecutor(len(inputs)) as pool:
        return list(pool.map(ask_together, inputs))


def _new_batches(server: Server, before: dict) -> list[dict]:
    after = server.stats()
    assert after["batches"] > before["batches"]
    return after["recent_batches"][-(after["batches"] - before["batches"]) :]


def test_concurrent_chats_are_batched(server):
    client = server.client()
    questions = [[{"role": "user", "content": f"What is {i} + {i}?"}] for i in range(8)]

    def ask(messages):
        reply = client.chat.completions.create(
            model=server.model, messages=messages, max_tokens=6, temperature=0
        )
        return reply.choices[0].message.content

    before = server.stats()
    together = _all_at_once(ask, questions)
    batches = _new_batches(server, before)
    assert sum(len(b["rows"]) for b in batches) == 8
    assert len(batches) < 8 and max(len(b["rows"]) for b in batches) > 1  # some requests shared a batch
    assert all(isinstance(text, str) for text in together)
    assert "batch: " in server.log.read_text()


def test_each_batched_row_gets_its_own_reply(server):
    """Prompts the short run continues differently (spaces, newlines), decoded together, each
    get what they get alone: no row's text goes to another request."""
    client = server.client()
    prompts = ["x = [", "impor", "class ", "return"] * 2

    def ask(prompt):
        reply = client.completions.create(model=server.model, prompt=prompt, max_tokens=6, temperature=0)
        return reply.choices[0].text

    before = server.stats()
    together = _all_at_once(ask, prompts)
    assert max(len(b["rows"]) for b in _new_batches(server, before)) > 1
    alone = [ask(p) for p in prompts[:4]]
    assert len(set(alone)) > 1  # the check below could tell rows apart
    assert together == alone * 2


LONG_PROMPT = "def f(x):\n    return x\n" * 20


@pytest.mark.parametrize(
    "path, body, status, words",
    [
        ("/v1/chat/completions", b'{"model": "m", "messages": [', 400, "not valid JSON"),
        ("/v1/chat/completions", {"model": "gpt-4o", "messages": ASK}, 404, "'gpt-4o' does not exist"),
        ("/v1/completions", {"prompt": LONG_PROMPT}, 400, "the model's context is 32 tokens"),
        ("/v1/chat/completions", {"messages": ASK, "temperature": -1}, 400, "temperature"),
        ("/v1/chat/completions", {"messages": ASK, "top_p": 0}, 400, "top_p"),
        ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/chat/completions", {"messages": ASK, "n": 2}, 400, "only n=1"),
        ("/v1/chat/completions", {}, 400, "messages: Field required"),
        ("/v1/completions", {"prompt": 7}, 400, "prompt: Input should be a valid string"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
        ("/v1/chat/completions", {"messages": ASK[::-1]}, 400, "only the first may be"),
    ],
    ids=[
        "bad-json",
        "unknown-model",
        "too-long",
        "temperature",
        "top-p-zero",
        "top-p-above-1",
        "max-tokens",
        "n",
        "no-messages",
        "prompt-type",
        "role",
        "system-not-first",
    ],
)
def test_bad_requests_get_an_openai_error(server, path, body, status, words):
    if isinstance(body, dict):
        body = json.dumps({"model": server.model, **body}).encode()
    got, answer = server.post(path, body)
    assert got == status, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert words in answer["error"]["message"]


def test_too_long_prompt_names_both_lengths(server, short_run):
    tokens = 1 + len(Tokenizer.load(short_run / "tokenizer.model").encode(LONG_PROMPT))
    _, answer = server.post(
        "/v1/completions", json.dumps({"model": server.model, "prompt": LONG_PROMPT}).encode()
    )
    assert answer["error"]["message"].startswith(f"the prompt is {tokens} tokens")
    assert answer["error"]["code"] == "context_length_exceeded"


def test_a_client_leaving_mid_stream_frees_its_row(server):
    """The client reads the first chunk (the role, sent before decoding starts) and hangs up:
    its row is dropped long before the context is used up, and the next request is answered."""
    body = {"model": server.model, "messages": HI, "temperature": 0, "stream": True}
    connection = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=30)
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    assert b'"role": "assistant"' in response.readline()
    connection.close()

    started = time.monotonic()
    reply = server.client().completions.create(
        model=server.model, prompt="import", max_tokens=4, temperature=0
    )
    assert reply.choices[0].text is not None and time.monotonic() - started < 10
    rows = [row for batch in server.stats()["recent_batches"] for row in batch["rows"]]
    left = [row for row in rows if row["finish_reason"] == "left"]
    assert left and left[-1]["tokens"] < left[-1]["max_tokens"], rows


def test_a_taken_port_or_a_missing_checkpoint_exits_2(short_run, tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert serve.main(["--workdir", str(short_run), "--port", port]) == 2
    taken_line = f"lmjax: error: cannot listen on 127.0.0.1:{port} (Address already in use); pick another"
    assert capsys.readouterr().err.strip().splitlines() == [f"{taken_line} --port or --host"]
    assert serve.main(["--workdir", str(tmp_path), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmjax: error: ")
