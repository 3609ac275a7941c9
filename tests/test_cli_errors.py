"""What a user gets wrong on the command line is one line on stderr and exit code 2, never a
traceback: each row gives the arguments, the files it needs and the exact line printed. The
verbs run in-process (`lorakit.cli.main`), so the rows are fast; one subprocess run shows that
nothing else reaches stderr. Exceptions that are not about the user's input stay tracebacks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model_dir

from lorakit.builtin import build_tokenizer
from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.model_io import resolve_device


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_model_dir(path, build_tokenizer(), positions=256)
    return path


def _model_copy(tmp: Path, model: Path, name: str) -> Path:
    """A copy of the tiny model directory to break."""
    copy = tmp / name
    copy.mkdir()
    for file in model.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    return copy


def _write(name: str, content: bytes):
    return lambda tmp, model: (tmp / name).write_bytes(content)


def _no_model_type(tmp: Path, model: Path) -> None:
    (_model_copy(tmp, model, "broken") / "config.json").write_text("{}")


def _corrupt_weights(tmp: Path, model: Path) -> None:
    (_model_copy(tmp, model, "broken") / "model.safetensors").write_bytes(b"garbage" * 10)


def _bad_tokenizer(tmp: Path, model: Path) -> None:
    (_model_copy(tmp, model, "broken") / "tokenizer_config.json").write_text("{bad")


def _adapter_config(content: bytes):
    def setup(tmp: Path, model: Path) -> None:
        (tmp / "adapter").mkdir()
        (tmp / "adapter" / "adapter_config.json").write_bytes(content)
    return setup


def _mkdir(name: str):
    return lambda tmp, model: (tmp / name).mkdir()


NO_MODEL = ("cannot load model '{tmp}/nowhere': it is not a local model directory (the path does not exist) and "
            "not a hub id (those look like org/name)")
BAD_DEVICE = "--device 'gpu0' is not a device; use auto, cpu, cuda or cuda:N"

# (argv, setup(tmp, model) or None, the line on stderr); {tmp} and {model} are filled in
CASES = [
    pytest.param(["train", "{tmp}/bad.yaml"], _write("bad.yaml", b"model:\n  name_or_path: \xff\n"),
                 "lorakit train: error: {tmp}/bad.yaml:2: not valid UTF-8 (byte 0xff at byte offset 23); the file "
                 "must be UTF-8 text", id="config-not-utf8"),
    pytest.param(["preview-data", "model.name_or_path={model}", "data.train={tmp}/bad.jsonl"],
                 _write("bad.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": "\xe9t\xe9"}\n'),
                 "lorakit preview-data: error: {tmp}/bad.jsonl:3: not valid UTF-8 (byte 0xe9 at byte offset 38); "
                 "the file must be UTF-8 text", id="jsonl-not-utf8"),
    pytest.param(["preview-data", "model.name_or_path={model}", "data.train={tmp}/bad.json"],
                 _write("bad.json", b'[{"text": "a"},\n {"text": "\xe9"}]\n'),
                 "lorakit preview-data: error: {tmp}/bad.json:2: not valid UTF-8 (byte 0xe9 at byte offset 27); "
                 "the file must be UTF-8 text", id="json-not-utf8"),
    pytest.param(["preview-data", "model.name_or_path={model}", "data.train={tmp}/bad.csv"],
                 _write("bad.csv", b"text\na\n\xe9\n"),
                 "lorakit preview-data: error: {tmp}/bad.csv:3: not valid UTF-8 (byte 0xe9 at byte offset 7); "
                 "the file must be UTF-8 text", id="csv-not-utf8"),
    pytest.param(["generate", "--model", "{model}", "--messages", "{tmp}/messages.json", "--no-stream"],
                 _write("messages.json", b'[{"role": "user", "content": "\xe9"}]'),
                 "lorakit generate: error: {tmp}/messages.json:1: not valid UTF-8 (byte 0xe9 at byte offset 30); "
                 "the file must be UTF-8 text", id="messages-file-not-utf8"),
    pytest.param(["preview-data", "model.name_or_path={tmp}/nowhere"], None,
                 "lorakit preview-data: error: " + NO_MODEL, id="missing-model-dir-tokenizer-first"),
    pytest.param(["generate", "--model", "{tmp}/nowhere", "--prompt", "hi"], None,
                 "lorakit generate: error: " + NO_MODEL, id="missing-model-dir"),
    pytest.param(["serve", "--model", "{tmp}/nowhere"], None, "lorakit serve: error: " + NO_MODEL,
                 id="serve-missing-model-dir"),
    pytest.param(["generate", "--model", "{tmp}/broken", "--prompt", "hi"], _no_model_type,
                 "lorakit generate: error: cannot load model '{tmp}/broken': its files are not a loadable "
                 "model (ValueError: Unrecognized model in {tmp}/broken. Should have a `model_type` key in its "
                 "config.json.)", id="model-config-without-model-type"),
    pytest.param(["generate", "--model", "{tmp}/broken", "--prompt", "hi"], _corrupt_weights,
                 "lorakit generate: error: cannot load model '{tmp}/broken': its files are not a loadable "
                 "model (SafetensorError: Error while deserializing header: header too large)",
                 id="model-weights-corrupt"),
    pytest.param(["generate", "--model", "{tmp}/broken", "--prompt", "hi"], _bad_tokenizer,
                 "lorakit generate: error: cannot load model '{tmp}/broken': its files are not a loadable "
                 "tokenizer (JSONDecodeError: Expecting property name enclosed in double quotes: line 1 column 2 "
                 "(char 1))", id="tokenizer-config-bad-json"),
    pytest.param(["generate", "--model", "{model}", "--device", "gpu0", "--prompt", "hi"], None,
                 "lorakit generate: error: " + BAD_DEVICE, id="generate-device-flag"),
    pytest.param(["chat", "--model", "{model}", "--device", "gpu0"], None, "lorakit chat: error: " + BAD_DEVICE,
                 id="chat-device-flag"),
    pytest.param(["serve", "--model", "{model}", "--device", "gpu0"], None, "lorakit serve: error: " + BAD_DEVICE,
                 id="serve-device-flag"),
    pytest.param(["eval", "model.name_or_path={model}", "model.device=gpu0", "--data", "{tmp}/x.jsonl"], None,
                 "lorakit eval: error: model.device 'gpu0' is not a device; use auto, cpu, cuda or cuda:N",
                 id="config-device-key"),
    pytest.param(["generate", "--model", "{model}", "--device", "cuda", "--prompt", "hi"], None,
                 "lorakit generate: error: --device 'cuda': no CUDA device is available here; use cpu, or auto "
                 "(cuda when there is one)", id="cuda-without-gpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")),
    pytest.param(["train", "{tmp}/configs"], _mkdir("configs"), "lorakit train: error: {tmp}/configs: Is a directory",
                 id="config-is-a-directory"),
    pytest.param(["train", "training.lr=["], None, "lorakit train: error: override 'training.lr=[': the value is not "
                 "valid YAML (expected the node content, but found '<stream end>')", id="override-bad-yaml"),
    pytest.param(["train", "training.lr={{a: 1, a: 2}}"], None, "lorakit train: error: override 'training.lr={{a: 1, "
                 "a: 2}}': the value is not valid YAML (duplicate key 'a', first given on line 1; keep one of them)",
                 id="override-duplicate-key"),
    # already one line before this file: kept here so they stay that way
    pytest.param(["train", "{tmp}/syntax.yaml"], _write("syntax.yaml", b"model: [\n"),
                 "lorakit train: error: {tmp}/syntax.yaml:2: not valid YAML (expected the node content, but found "
                 "'<stream end>')", id="config-bad-yaml"),
    pytest.param(["train", "{tmp}/none.yaml"], None, "lorakit train: error: config file {tmp}/none.yaml not found",
                 id="config-missing"),
    pytest.param(["generate", "--model", "{model}", "--messages", "[{{bad"], None,
                 'lorakit generate: error: --messages is not valid JSON (line 1: Expecting property name enclosed in '
                 'double quotes); give a list of {{"role": ..., "content": ...}} objects or a file holding one',
                 id="messages-bad-json"),
    pytest.param(["merge", "{tmp}/nope", "--out", "{tmp}/out"], None,
                 "lorakit merge: error: adapter directory {tmp}/nope does not exist", id="merge-missing-adapter"),
    pytest.param(["combine", "{tmp}/nope", "--weights", "1", "--method", "linear", "--out", "{tmp}/out"], None,
                 "lorakit combine: error: adapter directory {tmp}/nope does not exist", id="combine-missing-adapter"),
    pytest.param(["generate", "--adapter", "{tmp}/adapter", "--prompt", "hi"],
                 _adapter_config(b"{"),
                 "lorakit generate: error: {tmp}/adapter/adapter_config.json:1: not valid JSON (Expecting property "
                 "name enclosed in double quotes)", id="adapter-config-bad-json"),
    pytest.param(["eval", "model.name_or_path={model}", "--data", "{tmp}/missing.jsonl"], None,
                 "lorakit eval: error: {tmp}/missing.jsonl: data file not found; give a .jsonl, .json or .csv file, a "
                 "directory saved with datasets' save_to_disk, hf:NAME[:SPLIT] or 'lorakit/tiny-tasks'",
                 id="eval-missing-data"),
]


@pytest.mark.parametrize("argv, setup, expected", CASES)
def test_user_error_is_one_line(argv, setup, expected, model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)   # nothing a verb writes by default lands in the checkout
    if setup is not None:
        setup(tmp_path, model)
    fill = {"tmp": tmp_path, "model": model}
    assert main([arg.format(**fill) for arg in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == expected.format(**fill)


def test_no_traceback_reaches_stderr(tmp_path):
    """The installed entry point, as a user runs it: the message alone, exit code 2."""
    config = tmp_path / "bad.yaml"
    config.write_bytes(b"lora:\n  r: 8\n  lora_alpha: \xc3\x28\n")
    run = subprocess.run([sys.executable, "-m", "lorakit", "train", str(config)], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert run.returncode == 2
    assert run.stderr == (f"lorakit train: error: {config}:3: not valid UTF-8 (byte 0xc3 at byte offset 27); the file "
                          "must be UTF-8 text\n")


def test_a_bug_stays_a_traceback(monkeypatch):
    """An exception that is not about the user's input (here a KeyError, or an OSError naming no
    file) is a bug or the machine's trouble: it propagates with its traceback."""
    import lorakit.train.config

    def broken(*args):
        raise KeyError("internal")

    monkeypatch.setattr(lorakit.train.config, "load_config", broken)
    with pytest.raises(KeyError):
        main(["train"])

    def no_file(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lorakit.train.config, "load_config", no_file)
    with pytest.raises(OSError, match="No space left"):
        main(["train"])


def test_cuda_index_beyond_the_devices_names_the_source(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"^model.device 'cuda:2': there are 2 CUDA devices here \(cuda:0 to "
                                          r"cuda:1\)$"):
        resolve_device("cuda:2")
    with pytest.raises(ConfigError, match=r"^--device 'cuda:5': there are 2 CUDA devices here \(cuda:0 to cuda:1\)$"):
        resolve_device("cuda:5", source="--device")


def test_messages_file_is_read_as_utf8(model, tmp_path, capsys):
    """A messages file in UTF-8 is read as UTF-8 whatever the locale says."""
    messages = tmp_path / "messages.json"
    messages.write_text(json.dumps([{"role": "user", "content": "é"}], ensure_ascii=False), encoding="utf-8")
    assert main(["generate", "--model", str(model), "--messages", str(messages), "--no-stream",
                 "--max-new-tokens", "2", "--device", "cpu"]) == 0
