"""Fixtures for the serving tests (imported by conftest.py; the test modules import this module by its
own name): a tiny model directory with eight adapters, `lorakit serve` running on it in a
subprocess, the app under uvicorn in process (`serve`), and the offline references (`lorakit
generate`'s code path, run in a subprocess too).

The model is a 2-layer, width-32 Llama with the built-in byte tokenizer. Its output head is
zeroed except on letters, digits, a little punctuation, the space and the end token, so greedy
text is readable and sometimes stops early; its weights are drawn with std 0.2 so greedy choices
have clear margins (the smallest gap between the two best logits along every reference path of
the 8 x 8 grid below is 1e-3, far above float32 noise), and batched serving must reproduce the
offline tokens exactly. The adapters (r=4, all-linear) get random B, so each changes the text.

Both subprocesses run torch on one thread: on a shared 2-core machine, two OpenMP threads per
process stall each other and make a 16-token request take seconds.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import string
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model
from transformers import LlamaForCausalLM

import lorakit as lk
from lorakit.builtin import build_tokenizer
from lorakit.inject import lora_layers

HERE = Path(__file__).parent
ADAPTERS = [f"a{i}" for i in range(8)]
PROMPTS = ["Hello there", "The cat", "a", "Once upon a time in a land far away", "1 2 3 4", "xyz", "Tell me",
           "ok ok ok ok ok"]
MAX_TOKENS = 16
BASE_NAME = "tiny"          # --served-model-name
SERVER_LIMITS = dict(max_tokens=200, max_prompt_tokens=128, max_prefill_tokens=1024, max_body_bytes=65536,
                     max_batch_size=32)
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def build_model_dir(path: Path) -> LlamaForCausalLM:
    """The tiny model of the module doc, saved with its tokenizer to `path`."""
    tokenizer = build_tokenizer()
    model = tiny_model(seed=1, tokenizer=tokenizer, positions=256, initializer_range=0.2)
    readable = string.ascii_letters + string.digits + ".,!?;:'-"
    keep = {tokenizer.convert_tokens_to_ids(c) for c in readable} | {tokenizer.convert_tokens_to_ids("Ġ"),
                                                                     tokenizer.eos_token_id}
    silent = torch.ones(len(tokenizer), dtype=torch.bool)
    silent[sorted(keep)] = False
    with torch.no_grad():
        model.lm_head.weight[silent] = 0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def make_adapter(model, name: str, seed: int, out: Path, r: int = 4) -> None:
    """A random adapter saved to `out` (then removed from `model`)."""
    lk.add_adapter(model, lk.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"), name=name)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if name in layer.r:
                B = layer.lora_B[name].weight
                B.copy_(torch.randn(B.shape, generator=gen) * 0.1)
    lk.save_adapter(model, out, name=name)
    lk.delete_adapter(model, name)


@pytest.fixture(scope="session")
def serve_files(tmp_path_factory) -> dict[str, Path]:
    """model/, adapters/a0..a7 (served from start), staging/hot and staging/outside (not inside the
    adapters dir), each a PEFT-format adapter."""
    root = tmp_path_factory.mktemp("serve")
    model = build_model_dir(root / "model")
    for i, name in enumerate(ADAPTERS):
        make_adapter(model, name, 100 + i, root / "adapters" / name)
    make_adapter(model, "hot", 200, root / "staging" / "hot")
    make_adapter(model, "outside", 201, root / "staging" / "outside")
    return {"root": root, "model": root / "model", "adapters": root / "adapters", "staging": root / "staging"}


def served_model(serve_files, adapters=ADAPTERS[:4]) -> LlamaForCausalLM:
    """The tiny model loaded from its directory with `adapters` (not active), as the server holds it."""
    model = LlamaForCausalLM.from_pretrained(serve_files["model"]).eval()
    for name in adapters:
        lk.load_adapter(model, serve_files["adapters"] / name, name=name, activate=False)
    return model


def slowed(model, seconds: float, fail_on: set[int] = frozenset()):
    """Sleep `seconds` in every forward; raise on the calls numbered in `fail_on` (0-based)."""
    forward, calls = model.forward, [0]

    @functools.wraps(forward)
    def slow_forward(*args, **kwargs):
        calls[0] += 1
        if calls[0] - 1 in fail_on:
            raise RuntimeError("simulated device failure")
        time.sleep(seconds)
        return forward(*args, **kwargs)

    model.forward = slow_forward
    return model


def long_case(refs, adapters=ADAPTERS) -> tuple[str, str]:
    """An (adapter, prompt) whose offline text runs all MAX_TOKENS tokens."""
    return next((a, p) for a in adapters for p in PROMPTS if refs[(a, p)]["tokens"] == MAX_TOKENS
                and not refs[(a, p)]["eos"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, method: str = "GET", body: bytes | dict | None = None, headers: dict | None = None,
         timeout: float = 60) -> tuple[int, dict]:
    """(status, JSON body) of a raw request; errors come back as their status, not raised."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def wait_healthy(url: str, process: subprocess.Popen | None, log: Path | None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if http(f"{url}/health", timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server did not become healthy in {timeout} s")


@pytest.fixture(scope="session")
def server(serve_files, refs, tmp_path_factory):
    """`lorakit serve` (the real CLI) on 127.0.0.1 with a0..a7 from the adapters dir. Yields
    {"url", "log", "process"}; stopped with SIGINT (graceful shutdown) at the end. The offline
    references (`refs`) are started first, so they compute while the server loads."""
    port = free_port()
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    limits = [f"--{k.replace('_', '-')}={v}" for k, v in SERVER_LIMITS.items()]
    command = [sys.executable, "-m", "lorakit", "serve", "--model", str(serve_files["model"]), "--adapters-dir",
               str(serve_files["adapters"]), "--served-model-name", BASE_NAME, "--port", str(port), "--dtype", "fp32",
               "--device", "cpu", *limits]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=ONE_THREAD)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log)
        yield {"url": url, "log": log, "process": process}
    finally:
        process.send_signal(2)   # SIGINT: uvicorn's graceful shutdown
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    # whatever the tests sent: no 5xx, no traceback, and a clean exit
    text = log.read_text()
    assert process.returncode == 0 and "Application shutdown complete" in text, text[-3000:]
    assert "Traceback" not in text and '" 5' not in text, text[-3000:]


@pytest.fixture
def client(server):
    import openai

    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=60)


CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour"},
     {"role": "assistant", "content": "red"}, {"role": "user", "content": "Another"}],
]
CHAT_ADAPTERS = ["a2", "a5"]
CHAT_TOKENS = 24
CLI_CASE = ("a4", PROMPTS[4])


def _reference_jobs(files: dict[str, Path]) -> tuple[list[tuple], list[dict]]:
    """(key, job) of every offline reference the tests compare with: the 8 x 8 grid and the base
    model on the same prompts, the hot-loaded adapter, and the chats."""
    keys, jobs = [], []
    for adapter in [*ADAPTERS, None, "hot"]:
        directory = None if adapter is None else str(files["staging" if adapter == "hot" else "adapters"] / adapter)
        for prompt in PROMPTS:
            keys.append((adapter, prompt))
            jobs.append({"adapter": directory, "prompt": prompt, "max_new_tokens": MAX_TOKENS})
    for adapter in CHAT_ADAPTERS:
        for i, messages in enumerate(CHATS):
            keys.append((adapter, f"chat{i}"))
            jobs.append({"adapter": str(files["adapters"] / adapter), "messages": messages,
                         "max_new_tokens": CHAT_TOKENS})
    return keys, jobs


class References:
    """The offline references, computed in the background from the start of the session (one
    worker subprocess), and `lorakit generate` itself on one case (another). `refs[(adapter,
    prompt)]` -> {"text", "tokens"}; adapter None is the base model, prompt "chat0"/"chat1" a chat."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.keys, jobs = _reference_jobs(files)
        self._worker = subprocess.Popen([sys.executable, str(HERE / "serve_offline_worker.py")],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env=ONE_THREAD)
        self._spec = json.dumps({"model": str(files["model"]), "jobs": jobs})
        adapter, prompt = CLI_CASE
        self._cli = subprocess.Popen(
            [sys.executable, "-m", "lorakit", "generate", "--model", str(files["model"]), "--adapter",
             str(files["adapters"] / adapter), "--prompt", prompt, "--max-new-tokens", str(MAX_TOKENS), "--dtype",
             "fp32", "--device", "cpu", "--no-stream"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=ONE_THREAD)
        self._refs: dict | None = None
        self._printed: str | None = None

    def __getitem__(self, key: tuple) -> dict:
        if self._refs is None:
            out, err = self._worker.communicate(self._spec, timeout=600)
            if self._worker.returncode:
                raise RuntimeError(err[-3000:])
            self._refs = dict(zip(self.keys, json.loads(out.strip().splitlines()[-1]), strict=True))
        return self._refs[key]

    def cli_output(self) -> str:
        """What `lorakit generate --no-stream` printed for CLI_CASE."""
        if self._printed is None:
            out, err = self._cli.communicate(timeout=600)
            if self._cli.returncode:
                raise RuntimeError(err[-3000:])
            self._printed = out
        return self._printed

    def close(self) -> None:
        for process in (self._worker, self._cli):
            if process.poll() is None:
                process.kill()
                process.communicate()


@pytest.fixture(scope="session")
def refs(serve_files):
    references = References(serve_files)
    yield references
    references.close()


class InProcess:
    """uvicorn serving `app` on 127.0.0.1 in a thread."""

    def __init__(self, app, grace_s: int = 30) -> None:
        import openai
        import uvicorn

        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    timeout_graceful_shutdown=grace_s))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


@pytest.fixture
def serve(serve_files):
    """serve(engine, **create_app kwargs) -> a running InProcess; stopped at the end."""
    from lorakit.serve import create_app

    running = []

    def start(engine, grace_s: int = 30, **kwargs) -> InProcess:
        server = InProcess(create_app(engine, "tiny", **kwargs), grace_s)
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop()


def wait_idle(url: str, timeout: float = 20) -> dict:
    """/health once nothing runs or waits (fails after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        body = http(url + "/health")[1]
        if body["running"] == 0 and body["waiting"] == 0:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.05)
