import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import lorakit as lk
from lorakit.cli import main as cli_main
from lorakit.train.config import load_config
from lorakit.train.loop import TrainingDiverged, build_optimizer, train


def run(overrides):
    return train(load_config(None, overrides))


def adapter_tensors(path):
    return load_file(Path(path) / "adapter_model.safetensors")


def logged_losses(path):
    with open(Path(path) / "metrics.csv") as f:
        return [(int(r["step"]), r["loss"]) for r in csv.DictReader(f) if r["loss"]]


def test_run_directory_is_a_complete_artifact(base_overrides, tmp_path, model_dir):
    summary = run(base_overrides)
    out = tmp_path / "run"
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "config.yaml", "metrics.csv", "loss.png", "README.md", "checkpoints"} <= names
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000006"]
    assert [s for s, _ in logged_losses(out)] == [1, 2, 3, 4, 5, 6]
    assert summary.eval_before is not None and summary.eval_after.loss < summary.eval_before.loss
    assert lk.read_adapter_config(out).base_model_name_or_path == str(model_dir)
    # the adapter loads in PEFT onto the base and gives lorakit's logits
    peft = pytest.importorskip("peft")
    ids = torch.tensor([[5, 80, 90, 100, 110]])
    mine = lk.load_adapter(AutoModelForCausalLM.from_pretrained(model_dir), out).eval()
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(out)).eval()
    torch.testing.assert_close(mine(ids).logits, theirs(ids).logits, atol=1e-5, rtol=0)


def test_loss_is_normalised_by_trained_tokens_across_accumulation(base_overrides, tmp_path):
    """Rows have different answer lengths: a mean of per-micro-batch means would weigh tokens
    differently, so equal adapters show the per-token normalisation."""
    one = run(base_overrides + ["training.micro_batch_size=4", "training.grad_accum=1",
                                f"output.dir={tmp_path / 'a'}"])
    two = run(base_overrides + ["training.micro_batch_size=1", "training.grad_accum=4",
                                f"output.dir={tmp_path / 'b'}"])
    a, b = adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b")
    for k in a:   # Adam divides by the gradient's scale, so float rounding shows at ~1e-6
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)
    assert one.losses == pytest.approx(two.losses, rel=1e-5)


def test_gradient_checkpointing_trains_the_same_adapter(base_overrides, tmp_path):
    run(base_overrides + [f"output.dir={tmp_path / 'a'}"])
    run(base_overrides + ["training.gradient_checkpointing=true", f"output.dir={tmp_path / 'b'}"])
    a, b = adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_offload_activations_needs_checkpointing():
    with pytest.raises(lk.ConfigError, match="training.offload_activations moves the checkpointed layer inputs to "
                                             "CPU memory, so it needs training.gradient_checkpointing: true"):
        load_config(None, ["training.offload_activations=true"])


@pytest.mark.gpu
def test_offloaded_checkpointing_trains_the_same_adapter_on_a_gpu(base_overrides, tmp_path):
    gpu = [*base_overrides, "model.device=cuda", "training.bf16=false", "training.gradient_checkpointing=true"]
    run(gpu + [f"output.dir={tmp_path / 'a'}"])
    run(gpu + ["training.offload_activations=true", f"output.dir={tmp_path / 'b'}"])
    a, b = adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_offload_on_cpu_changes_nothing(base_overrides, tmp_path):
    """The layer inputs already live in host memory: the CPU run is the plain checkpointed one."""
    ckpt = [*base_overrides, "training.gradient_checkpointing=true"]
    run(ckpt + [f"output.dir={tmp_path / 'a'}"])
    run(ckpt + ["training.offload_activations=true", f"output.dir={tmp_path / 'b'}"])
    a, b = adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def kill_after_checkpoint(proc: subprocess.Popen, out: Path, step: int, log: Path, timeout: float = 300) -> None:
    """SIGKILL the `lorakit train` run `proc` (writing to `out`) once it has announced `step` by its
    checkpoint directory (renamed into place whole, so one that exists is complete), at a moment when
    no other checkpoint is half written. No timing is assumed: the run is frozen (SIGSTOP) before the
    checkpoints are looked at, so what is seen is what the kill leaves; a run that ends or fails
    before the kill fails the test, saying which."""
    checkpoints, deadline = out / "checkpoints", time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the run exited with {proc.returncode} before its checkpoint of step {step} could be "
                            f"killed" + (": it finished all its steps; give it more" if proc.returncode == 0 else "")
                            + f"\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no checkpoint of step {step} in {out} after {timeout} s\n{log.read_text()[-3000:]}")
            if (checkpoints / f"step-{step:08d}").is_dir():
                os.kill(proc.pid, signal.SIGSTOP)
                _, status = os.waitpid(proc.pid, os.WUNTRACED)   # returns once it is stopped (or gone)
                if not os.WIFSTOPPED(status):
                    proc.returncode = os.waitstatus_to_exitcode(status)
                    continue                                    # reported above
                if not any(p.name.startswith(".") for p in checkpoints.iterdir()):   # no temp dir of atomic_dir
                    break
                os.kill(proc.pid, signal.SIGCONT)               # mid-write: let it finish that checkpoint
            time.sleep(0.005)
    finally:   # killed here, stopped or not; and never left behind when the test fails
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def test_resume_after_sigkill_is_exact(base_overrides, tmp_path):
    """Kill a run with SIGKILL mid-training, resume it: same adapter and same logged losses as an
    uninterrupted run (with dropout on, so the RNG state must be restored too). The kill comes right
    after the step-10 checkpoint, 30 steps before the end."""
    common = [o for o in base_overrides if not o.startswith(("output.dir", "training.max_steps"))] + [
        "training.max_steps=40", "training.save_every=5", "training.keep_last=3", "lora.lora_dropout=0.1",
        "training.schedule=cosine", "training.warmup_steps=3"]
    run(common + [f"output.dir={tmp_path / 'full'}"])
    killed, log = tmp_path / "killed", tmp_path / "killed.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lorakit", "train", *common, f"output.dir={killed}"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    kill_after_checkpoint(proc, killed, 10, log)
    done = [s for s, _ in logged_losses(killed)]
    assert 10 <= max(done) < 40
    run(common + [f"output.dir={killed}", "training.resume=auto"])
    assert logged_losses(killed) == logged_losses(tmp_path / "full")
    a, b = adapter_tensors(tmp_path / "full"), adapter_tensors(killed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)
    assert len(list((killed / "checkpoints").iterdir())) == 3     # keep_last


def test_resume_with_other_settings_is_refused(base_overrides, tmp_path):
    run(base_overrides)
    with pytest.raises(lk.LoraError) as e:
        run(base_overrides + ["lora.r=8", "training.lr=1e-3", "training.seed=3", "training.resume=auto"])
    assert str(e.value) == (f"cannot resume from {tmp_path / 'run' / 'checkpoints' / 'step-00000006'}: "
                            "lora.r: 4 in the checkpoint, 8 now; training.seed: 0 in the checkpoint, 3 now. Resume "
                            "with the checkpoint's settings or start a new output.dir")   # lr may change on resume


def test_resume_of_a_complete_run_changes_nothing(base_overrides, tmp_path, capsys):
    """training.resume=auto on a finished run says so and leaves the run directory as it was (no
    second evaluation, no rows appended); with max_steps raised it trains on from the last step."""
    run(base_overrides)
    out = tmp_path / "run"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    summary = run(base_overrides + ["training.resume=auto"])
    assert summary.steps == 6 and summary.eval_after is None
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"already complete at step 6 of 6 ({out / 'checkpoints' / 'step-00000006'}); nothing was changed. "
        "To train further, raise training.max_steps")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    more = run(base_overrides + ["training.resume=auto", "training.max_steps=8"])
    assert more.steps == 8 and [s for s, _ in logged_losses(out)] == [1, 2, 3, 4, 5, 6, 7, 8]


def test_resume_from_missing_checkpoint(base_overrides, tmp_path):
    with pytest.raises(FileNotFoundError, match="resume checkpoint .*nowhere not found"):
        run(base_overrides + [f"training.resume={tmp_path / 'nowhere'}"])


def test_nan_loss_stops_with_a_checkpoint(base_overrides, tmp_path):
    with pytest.raises(TrainingDiverged, match=r"the loss became nan at step \d+; stopped with the last good state "
                                               r"saved in .*checkpoints/step-\d+"):
        run(base_overrides + ["training.lr=1e30", "training.max_grad_norm=null", "training.max_steps=20"])
    assert list((tmp_path / "run" / "checkpoints").iterdir())


def test_lora_plus_gives_b_its_own_learning_rate(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["q_proj"]))
    opt = build_optimizer(model, 1e-3, 0.0, 16.0, torch.device("cpu"))
    scales = sorted(g["lr_scale"] for g in opt.param_groups)
    assert scales == [1.0, 16.0]
    b_group = next(g for g in opt.param_groups if g["lr_scale"] == 16.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(".lora_B." in names[id(p)] for p in b_group["params"])


def test_packing_trains(base_overrides, tmp_path):
    summary = run(base_overrides + ["data.packing=true"])
    assert summary.eval_after.loss < summary.eval_before.loss


# ---- the other verbs on a trained run ----------------------------------------------------------


@pytest.fixture
def trained(base_overrides, tmp_path):
    run(base_overrides + ["training.max_steps=30"])
    return tmp_path / "run"


def test_merge_writes_a_plain_sharded_model(trained, tmp_path, model_dir):
    out = tmp_path / "merged"
    assert cli_main(["merge", str(trained), "--out", str(out), "--max-shard-size", "100KB"]) == 0
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    ids = torch.tensor([[5, 80, 90, 100, 110]])
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with_adapter = lk.load_adapter(AutoModelForCausalLM.from_pretrained(model_dir), trained).eval()
    torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, atol=1e-5, rtol=0)
    assert cli_main(["merge", str(trained), "--out", str(out)]) == 2     # refuses to overwrite


def test_generate_greedy_and_streaming(trained, capsys):
    args = ["generate", "--adapter", str(trained), "--messages", '[{"role": "user", "content": "echo navy"}]',
            "--max-new-tokens", "8"]
    assert cli_main(args + ["--no-stream"]) == 0
    plain = capsys.readouterr().out
    assert cli_main(args) == 0
    streamed = capsys.readouterr().out
    assert plain.strip() == streamed.strip() and plain.strip()


def test_generate_bad_messages(trained, capsys):
    assert cli_main(["generate", "--adapter", str(trained), "--messages", "[{oops"]) == 2
    assert "--messages is not valid JSON" in capsys.readouterr().err


def test_chat_reads_turns_until_eof(trained, monkeypatch, capsys):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("echo teal\necho navy\n"))
    assert cli_main(["chat", "--adapter", str(trained), "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.count("> ") == 3


def test_eval_verb(trained, base_overrides, capsys):
    assert cli_main(["eval", *base_overrides]) == 0
    out = capsys.readouterr().out
    assert out.startswith("eval_loss=") and "exact_match=" in out and "examples=4" in out


def test_eval_verb_says_what_truncation_dropped(trained, base_overrides, capsys):
    """At 16 tokens only 'navy' (a 15-token prompt) keeps an answer token: olive, maroon and silver
    have no loss, which the count alone would hide."""
    assert cli_main(["eval", *base_overrides, "data.max_seq_len=16"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith(" examples=1")
    assert out[1] == ("note: 3 of 4 evaluation records dropped with no trained token (3 lost theirs to truncation "
                      "at data.max_seq_len=16, 0 had none); raise data.max_seq_len to score them")


def test_train_help_lists_the_config_reference(capsys):
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    out = capsys.readouterr().out
    assert "training.lr (float, default 0.0002)" in out and "lora.r (int, default 16)" in out


def test_metrics_rows_eval_every_and_summary(base_overrides, tmp_path, capsys):
    """Eval at the start, every N steps and at the end; the lr column is the schedule's pure function;
    the summary reports throughput and peak memory."""
    from lorakit.train.metrics import MetricsLog
    from lorakit.train.schedule import lr_at

    summary = run(base_overrides + ["training.eval_every=2", "training.schedule=cosine", "training.warmup_steps=2"])
    rows = MetricsLog.read(tmp_path / "run" / "metrics.csv")
    assert [int(r["step"]) for r in rows if r["eval_loss"]] == [0, 2, 4, 6]
    train_rows = [r for r in rows if r["loss"]]
    assert [float(r["lr"]) for r in train_rows] == [lr_at(s, 6, 1e-2, 2, "cosine") for s in range(6)]
    assert all(float(r["tokens_per_s"]) > 0 and int(r["trained_tokens"]) > 0 for r in train_rows)
    assert summary.peak_memory_bytes > 0 and summary.tokens_per_s > 0
    out = capsys.readouterr().out
    assert "step 2: eval loss" in out and "step 4: eval loss" in out
    assert f"{summary.tokens_per_s:,.0f} tokens/s, peak memory {summary.peak_memory_bytes / 2**20:,.0f} MiB" in out


def test_same_seed_same_adapter_other_seed_other_adapter(base_overrides, tmp_path):
    run(base_overrides + [f"output.dir={tmp_path / 'a'}", "lora.lora_dropout=0.1"])
    run(base_overrides + [f"output.dir={tmp_path / 'b'}", "lora.lora_dropout=0.1"])
    run(base_overrides + [f"output.dir={tmp_path / 'c'}", "lora.lora_dropout=0.1", "training.seed=1"])
    a, b, c = (adapter_tensors(tmp_path / n) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_a_training_run_logs_plain_lines(base_overrides, capsys):
    """Under pytest stderr is not a terminal, as in `lorakit train ... 2> log`: no carriage returns
    (tqdm's redraws), and the last progress line is the final step's."""
    run(base_overrides)
    err = capsys.readouterr().err
    assert "\r" not in err
    last = [line for line in err.splitlines() if line.startswith("train: ")][-1]
    assert re.fullmatch(r"train: step 6/6 \(100%\), loss=\d+\.\d{4}, lr=1\.00e-02, tok_s=[\d,]+, "
                        r"\d\d:\d\d elapsed, 00:00 left", last)
