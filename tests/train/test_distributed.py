"""Several processes on the CPU (gloo): 2 processes with DDP or FSDP2 train the adapter 1 process
trains with the same global batch, a resumed run ends where the uninterrupted one does, and only
rank 0 writes. Every run is a real launch (`torchrun ... -m lorakit train`, or `lorakit train
--nproc 2`), each on its own free port."""

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed
from reward_functions import BREVITY
from safetensors.torch import load_file

from lorakit.errors import LoraError
from lorakit.train.config import load_config
from lorakit.train.loop import train

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                       reason="this torch build has no gloo backend for CPU processes"),
    pytest.mark.slow,   # every test here waits for torchrun launches (~10 s each on 2 cores)
]

# the training columns that are a function of the run (not of the clock)
EXACT = ["step", "epoch", "loss", "lr", "grad_norm", "trained_tokens", "eval_loss", "eval_ppl", "eval_exact_match"]
RUN_FILES = {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "config.yaml", "metrics.csv", "loss.png", "README.md", "checkpoints"}


@dataclass
class Run:
    out: Path
    log: str
    """Rank 0's stdout."""
    overrides: list[str]
    """Everything but output.dir: what a resumed run repeats."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command: list[str], **env: str) -> str:
    """Run a launcher to the end; its stdout (rank 0's log)."""
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    if proc.returncode != 0:   # the workers' own errors, then the launcher's summary
        errors = "\n".join(x for x in proc.stderr.splitlines() if x.startswith("[rank") or "rror" in x)
        pytest.fail(f"{' '.join(command)} exited with {proc.returncode}:\n{proc.stdout[-2000:]}\n{errors[-8000:]}\n"
                    f"{proc.stderr[-2000:]}")
    return proc.stdout


def torchrun(overrides: list[str]) -> str:
    return launch([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                   f"--master-port={free_port()}", "-m", "lorakit", "train", *overrides])


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter_model.safetensors")


def metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return [{k: r[k] for k in EXACT} for r in csv.DictReader(f)]


def losses(run: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["loss"]) for r in metrics(run) if r["loss"]}


@pytest.fixture(scope="module")
def common(model_dir, data_files):
    """The runs below differ only in processes, strategy and per-process batch (dropout off, so
    1 and 2 processes can agree)."""
    train_file, eval_file = data_files
    return [f"model.name_or_path={model_dir}", f"data.train={train_file}", f"data.eval={eval_file}",
            "data.max_seq_len=64", "training.lr=1e-2", "training.max_steps=6", "training.schedule=cosine",
            "training.warmup_steps=2", "lora.r=4", "lora.lora_alpha=8", "lora.lora_dropout=0",
            "output.tensorboard=false", "training.save_every=2", "training.keep_last=3"]


@pytest.fixture(scope="module")
def single(common, tmp_path_factory):
    """One process, micro-batch 4: the reference."""
    out = tmp_path_factory.mktemp("single")
    train(load_config(None, common + ["training.micro_batch_size=4", f"output.dir={out}"]))
    return out


@pytest.fixture(scope="module")
def ddp(common, tmp_path_factory) -> Run:
    """Two DDP processes x micro-batch 2, launched by `lorakit train --nproc 2` (torchrun
    --standalone: it finds a free port itself)."""
    out, overrides = tmp_path_factory.mktemp("ddp"), common + ["training.micro_batch_size=2", "training.strategy=ddp"]
    log = launch([sys.executable, "-m", "lorakit", "train", *overrides, f"output.dir={out}", "--nproc", "2"])
    return Run(out, log, overrides)


@pytest.fixture(scope="module")
def fsdp(common, tmp_path_factory) -> Run:
    out, overrides = tmp_path_factory.mktemp("fsdp"), common + ["training.micro_batch_size=2", "training.strategy=fsdp"]
    return Run(out, torchrun(overrides + [f"output.dir={out}"]), overrides)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_the_adapter_of_one_with_the_same_global_batch(strategy, single, request):
    run = request.getfixturevalue(strategy).out
    a, b = adapter(single), adapter(run)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    assert not all(torch.equal(t, torch.zeros_like(t)) for k, t in b.items() if "lora_B" in k)   # it trained
    one, two = losses(single), losses(run)
    assert list(two) == [1, 2, 3, 4, 5, 6]
    assert list(two.values()) == pytest.approx(list(one.values()), abs=1e-5, rel=0)
    rows_one, rows_two = metrics(single), metrics(run)
    assert [(r["step"], r["lr"], r["trained_tokens"]) for r in rows_two] == \
        [(r["step"], r["lr"], r["trained_tokens"]) for r in rows_one]    # same batches, same schedule
    # the gradient itself, not only Adam's scale-free step: a wrong factor of 2 shows here
    norms = [(float(r["grad_norm"]), float(s["grad_norm"])) for r, s in zip(rows_one, rows_two, strict=True)
             if r["grad_norm"]]
    assert [y for _, y in norms] == pytest.approx([x for x, _ in norms], rel=1e-5)
    evals = [(float(r["eval_loss"]), float(s["eval_loss"])) for r, s in zip(rows_one, rows_two, strict=True)
             if r["eval_loss"]]
    assert len(evals) == 2 and all(abs(x - y) <= 1e-5 for x, y in evals)


def test_fsdp_shards_the_model(fsdp):
    line = next(x for x in fsdp.log.splitlines() if x.startswith("fsdp: 2 processes"))
    held, total = (int(n.replace(",", "")) for n in line.split("holding ")[1].split(" parameters")[0].split(" of "))
    assert held < total


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_only_rank_0_writes(strategy, request):
    run: Run = request.getfixturevalue(strategy)
    assert RUN_FILES <= {p.name for p in run.out.iterdir()}
    assert not [p.name for p in run.out.rglob(".*")]    # no temporary file left behind
    steps = [int(r["step"]) for r in metrics(run.out)]
    assert steps == [0, 1, 2, 3, 4, 5, 6, 6]           # eval at 0, six steps, eval at 6: one row each
    assert sorted(p.name for p in (run.out / "checkpoints").iterdir()) == \
        ["step-00000002", "step-00000004", "step-00000006"]
    assert run.log.count("run written to") == 1
    # each process's RNG states are in the checkpoint, kept apart
    saved = load_file(run.out / "checkpoints" / "step-00000002" / "optimizer.safetensors")
    assert {"rng.cpu", "rank1.rng.cpu"} <= saved.keys()


@pytest.fixture(scope="module")
def ddp_dropout(common, tmp_path_factory) -> Run:
    """Two DDP processes with dropout on: each process draws its own masks, so resuming must restore
    each process's RNG state."""
    out = tmp_path_factory.mktemp("ddp-dropout")
    overrides = [o for o in common if not o.startswith("lora.lora_dropout")] + [
        "lora.lora_dropout=0.1", "training.micro_batch_size=2", "training.strategy=ddp"]
    return Run(out, torchrun(overrides + [f"output.dir={out}"]), overrides)


@pytest.mark.parametrize("strategy", ["ddp_dropout", "fsdp"])
def test_resume_is_exact(strategy, request, tmp_path):
    """A copy of a finished run cut back to its step-2 checkpoint (as if killed right after writing
    it), resumed with resume=auto: the same metrics rows and the same adapter, bitwise."""
    run: Run = request.getfixturevalue(strategy)
    full, cut = run.out, tmp_path / "cut"
    shutil.copytree(full, cut)
    for name in ["step-00000004", "step-00000006"]:
        shutil.rmtree(cut / "checkpoints" / name)
    for name in ["adapter_model.safetensors", "adapter_config.json", "loss.png", "README.md"]:
        (cut / name).unlink()
    log = torchrun(run.overrides + [f"output.dir={cut}", "training.resume=auto"])
    assert f"resumed from {cut / 'checkpoints' / 'step-00000002'} at step 2" in log
    assert metrics(cut) == metrics(full)
    a, b = adapter(full), adapter(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert RUN_FILES <= {p.name for p in cut.iterdir()}


def test_resume_with_another_number_of_processes_is_refused(ddp, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(ddp.out, copy)
    with pytest.raises(LoraError, match=r"written by a run of 2 process\(es\) and this run has 1; .* --nproc 2"):
        train(load_config(None, ddp.overrides + [f"output.dir={copy}", "training.resume=auto"]))


@pytest.mark.parametrize("objective", ["dpo", "kto", "grpo"])
def test_two_processes_train_the_preference_adapter_of_one(objective, model_dir, tmp_path):
    """dpo: pairs sliced over processes; kto: its KL estimate averaged over the global micro-batch;
    grpo: completions sampled as a function of the data order, so each process samples what one
    process would for its prompts."""
    path = tmp_path / "data.jsonl"
    words = ["red", "green", "blue", "cyan", "magenta", "yellow", "black", "white"]
    with open(path, "w") as f:
        for i, w in enumerate(words):
            prompt = [{"role": "user", "content": f"echo {w}"}]
            record = {"dpo": {"prompt": prompt, "chosen": [{"role": "assistant", "content": w}],
                              "rejected": [{"role": "assistant", "content": w.upper()}]},
                      "kto": {"prompt": f"echo {w}", "completion": w if i % 2 else w.upper(), "label": bool(i % 2)},
                      "grpo": {"prompt": prompt, "answer": w}}[objective]
            f.write(json.dumps(record) + "\n")
    common = [f"model.name_or_path={model_dir}", f"data.train={path}", "data.max_seq_len=64", "training.lr=1e-2",
              "training.max_steps=3", "lora.r=4", "lora.lora_alpha=8", "lora.lora_dropout=0",
              "output.tensorboard=false", f"training.objective={objective}",
              *(["grpo.max_completion_len=6", "grpo.group_size=2", f"grpo.rewards=[{BREVITY}]"] if objective == "grpo"
          else [])]
    train(load_config(None, common + ["training.micro_batch_size=4", f"output.dir={tmp_path / 'one'}"]))
    torchrun(common + ["training.micro_batch_size=2", "training.strategy=ddp", f"output.dir={tmp_path / 'two'}"])
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert any(a[k].abs().max() > 1e-4 for k in a if "lora_B" in k)   # trained: B left 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    assert list(losses(tmp_path / "two").values()) == pytest.approx(list(losses(tmp_path / "one").values()), abs=1e-5)
