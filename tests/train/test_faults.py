"""Training faults: a signal, a SIGKILL, a full disk, a second run on the same output.dir, an
output.dir that cannot be written. Nothing checkpointed or logged is lost, and every refusal is a
one-line message that says what to do."""

import csv
import errno
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from reward_functions import BREVITY
from safetensors.torch import load_file

import lorakit as lk
from lorakit.cli import main as cli_main
from lorakit.train import checkpoint, loop
from lorakit.train.config import load_config
from lorakit.train.metrics import MetricsLog
from lorakit.train.run_dir import OutputDirBusy, RunLock
from lorakit.train.signals import StopOnSignal, TrainingInterrupted


def run(overrides):
    return loop.train(load_config(None, overrides))


def without(overrides, *keys):
    return [o for o in overrides if not o.startswith(keys)]


def assert_same_adapter(a: Path, b: Path) -> None:
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert x.keys() == y.keys()
    assert all(torch.equal(x[k], y[k]) for k in x), "the adapters differ"


def checkpoint_names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def logged_steps(out: Path) -> list[int]:
    try:
        return [int(r["step"]) for r in MetricsLog.read(out / "metrics.csv") if r["loss"]]
    except FileNotFoundError:
        return []


def launch(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "a") as f:
        return subprocess.Popen([sys.executable, "-m", "lorakit", "train", *args], stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run exited with {proc.returncode} too early\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"timed out\n{log.read_text()[-3000:]}")
        time.sleep(0.005)


# ---- 9. SIGTERM / SIGINT: finish the step, checkpoint, say how to resume -------------------------


def test_sigint_stops_after_the_step_with_a_checkpoint_and_the_resumed_run_is_exact(base_overrides, tmp_path,
                                                                                    monkeypatch):
    common = without(base_overrides, "output.dir") + ["lora.lora_dropout=0.1"]
    run(common + [f"output.dir={tmp_path / 'full'}"])
    backward, calls, handlers = loop._backward, [], []

    def signal_during_step_3(*args):
        calls.append(1)
        if len(calls) == 3:
            handlers.append(signal.getsignal(signal.SIGINT))
            # to this thread, delivered before raise_signal returns (os.kill's process-directed signal may
            # land on another thread): before this step's forward, so the step still completes
            signal.raise_signal(signal.SIGINT)
        return backward(*args)

    monkeypatch.setattr(loop, "_backward", signal_during_step_3)
    # as at a terminal: a shell without job control starts a background job (`make test &`) with SIGINT
    # ignored, which the run rightly leaves ignored (test_an_ignored_signal_stays_ignored)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before, out = signal.getsignal(signal.SIGINT), tmp_path / "stopped"
        try:
            run(common + [f"output.dir={out}"])
        except TrainingInterrupted as e:
            assert re.fullmatch(r"stopped by SIGINT after step 3 of 6, checkpoint in .*step-00000003; to continue, "
                                r"run the same command with training.resume=auto", str(e)), str(e)
        else:
            pytest.fail(f"SIGINT did not stop the run; its handler when sent: {handlers}, {len(calls)} backward calls")
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert checkpoint_names(out) == ["step-00000003"] and logged_steps(out) == [1, 2, 3]
    monkeypatch.setattr(loop, "_backward", backward)
    run(common + [f"output.dir={out}", "training.resume=auto"])
    assert_same_adapter(tmp_path / "full", out)


def test_an_ignored_signal_stays_ignored():
    """`nohup`, or a background job of a shell without job control, starts the run with SIGINT
    ignored: the run leaves it so, and a SIGINT does not stop it."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopOnSignal() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)
            assert not stop.requested
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_second_signal_gets_the_previous_handler_at_once():
    got = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        mine = signal.getsignal(signal.SIGTERM)
        with StopOnSignal() as stop:
            signal.raise_signal(signal.SIGTERM)
            assert stop.signum == signal.SIGTERM and got == []
            signal.raise_signal(signal.SIGTERM)
            assert got == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_outside_the_main_thread_no_handler_is_installed():
    seen = []

    def body():
        with StopOnSignal():
            seen.append(signal.getsignal(signal.SIGTERM))

    worker = threading.Thread(target=body)
    worker.start()
    worker.join()
    assert seen == [signal.getsignal(signal.SIGTERM)]


def test_sigterm_to_lorakit_train_while_a_second_run_is_refused(base_overrides, tmp_path):
    """The CLI under SIGTERM exits 2 after a step, with its checkpoint and the resume command; while
    it runs, a second run on its output.dir is refused, naming it."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    args = without(base_overrides, "training.max_steps") + ["training.max_steps=1000"]
    proc = launch(args, log)
    try:
        wait_for(lambda: len(logged_steps(out)) >= 2, proc, log)
        with pytest.raises(OutputDirBusy, match=rf"output.dir {out} is in use by another run \(pid {proc.pid} on "
                                                rf"host {socket.gethostname()}\); wait for it to end"):
            run(args + ["training.max_steps=1"])
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == 2, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    last = logged_steps(out)[-1]
    assert log.read_text().strip().splitlines()[-1] == (
        f"lorakit train: error: stopped by SIGTERM after step {last} of 1000, checkpoint in "
        f"{out / 'checkpoints' / f'step-{last:08d}'}; to continue, run the same command with training.resume=auto")
    assert checkpoint_names(out) == [f"step-{last:08d}"]
    assert not (out / "train.lock").exists()


# ---- 10. metrics.csv rewritten atomically on resume -----------------------------------------------


def test_rewriting_metrics_on_resume_cannot_lose_the_history(tmp_path, monkeypatch):
    log = MetricsLog(tmp_path, None)
    for step in range(1, 6):
        log.log({"step": step, "loss": step / 10})
    log.close()
    history = (tmp_path / "metrics.csv").read_text()

    def disk_full(self, rows):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(csv.DictWriter, "writerows", disk_full)
    with pytest.raises(OSError):
        MetricsLog(tmp_path, 3)
    assert (tmp_path / "metrics.csv").read_text() == history
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]
    monkeypatch.undo()
    MetricsLog(tmp_path, 3).close()
    assert logged_steps(tmp_path) == [1, 2, 3]


# ---- 11. one run per output.dir; 12. a killed run's temporaries cleared --------------------------


def test_a_run_on_a_locked_output_dir_is_refused_before_loading(base_overrides, tmp_path, monkeypatch):
    out = tmp_path / "run"
    held = RunLock.acquire(out)
    monkeypatch.setattr(loop, "load_tokenizer", lambda *a: pytest.fail("loaded the tokenizer"))
    try:
        with pytest.raises(OutputDirBusy, match=rf"output.dir {out} is in use by another run \(pid {os.getpid()} "
                                                r"on host .*\); wait for it to end, stop it, or choose another "
                                                r"output.dir"):
            run(base_overrides)
    finally:
        held.release()
    assert not (out / "train.lock").exists()


def test_a_killed_runs_lock_and_temporaries_are_cleared(base_overrides, tmp_path):
    out = tmp_path / "run"
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    out.mkdir()
    (out / "train.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    half = out / "checkpoints" / ".step-00000004.k2j3h4l5"
    half.mkdir(parents=True)
    (half / "optimizer.safetensors").write_bytes(b"torn")
    (out / ".metrics.csv.x7y8z9.tmp").write_text("step,loss\n1,")
    (out / ".trackers.json.a1b2c3.tmp").write_text('{"wandb": ')
    run(base_overrides)
    assert checkpoint_names(out) == ["step-00000006"]
    assert not (out / "train.lock").exists() and not list(out.glob(".metrics.csv.*"))
    assert not list(out.glob(".trackers.json.*"))


def test_the_lock_is_released_when_the_run_fails(base_overrides, tmp_path):
    with pytest.raises(FileNotFoundError):
        run(base_overrides + [f"training.resume={tmp_path / 'nowhere'}"])
    assert not (tmp_path / "run" / "train.lock").exists()


# ---- 13. proof: random SIGKILLs, a full disk, an output.dir that cannot be written ---------------


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dpo", "grpo"])
def test_a_sigkilled_preference_run_resumes_to_the_uninterrupted_adapter(objective, base_overrides, tmp_path):
    """SIGKILL during the steps of a dpo run (reference forwards in the step) and of a grpo run
    (completions sampled in the step), then training.resume=auto: bit for bit the adapter and the
    losses of the run never killed (GRPO's sampling is a function of the data order, not of RNG
    state)."""
    data = tmp_path / "data.jsonl"
    words = ["red", "green", "blue", "cyan", "magenta", "yellow", "black", "white"]
    with open(data, "w") as f:
        for w in words:
            prompt = [{"role": "user", "content": f"echo {w}"}]
            f.write(json.dumps({"prompt": prompt, "chosen": [{"role": "assistant", "content": w}],
                                "rejected": [{"role": "assistant", "content": w.upper()}]} if objective == "dpo"
                               else {"prompt": prompt, "answer": w}) + "\n")
    common = without(base_overrides, "output.dir", "training.max_steps", "data.") + [
        f"data.train={data}", "data.max_seq_len=64", "training.max_steps=12", "training.save_every=1",
        "lora.lora_dropout=0.1", f"training.objective={objective}",
        *(["grpo.max_completion_len=6", "grpo.group_size=2", f"grpo.rewards=[{BREVITY}]"] if objective == "grpo"
          else [])]
    full, killed, log = tmp_path / "full", tmp_path / "killed", tmp_path / "killed.log"
    assert launch(common + [f"output.dir={full}"], tmp_path / "full.log").wait(timeout=300) == 0, \
        (tmp_path / "full.log").read_text()[-3000:]
    proc = launch(common + [f"output.dir={killed}"], log)
    wait_for(lambda: len(checkpoint.list_checkpoints(killed) or []) >= 2, proc, log)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc = launch(common + [f"output.dir={killed}", "training.resume=auto"], log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert "resumed from" in log.read_text()
    assert_same_adapter(full, killed)
    trained = load_file(full / "adapter_model.safetensors")
    assert any(trained[k].abs().max() > 1e-4 for k in trained if "lora_B" in k)   # B left 0
    losses = [(r["step"], r["loss"]) for r in MetricsLog.read(killed / "metrics.csv") if r["loss"]]
    assert losses == [(r["step"], r["loss"]) for r in MetricsLog.read(full / "metrics.csv") if r["loss"]]


@pytest.mark.slow
def test_random_sigkills_each_resumed_end_with_the_uninterrupted_adapter(base_overrides, tmp_path):
    """Ten SIGKILLs at seeded random moments (a quarter of them during start-up: lock take-over,
    clean-up, metrics rewrite; the others during the steps and their checkpoints), each followed by
    `training.resume=auto`: the same adapter, bit for bit, and the same logged losses as a run
    never killed."""
    common = without(base_overrides, "output.dir", "training.max_steps") + [
        "training.max_steps=30", "training.save_every=1", "lora.lora_dropout=0.1", "training.schedule=cosine",
        "training.warmup_steps=3"]
    full, killed, log = tmp_path / "full", tmp_path / "killed", tmp_path / "killed.log"
    t0 = time.monotonic()
    proc = launch(common + [f"output.dir={full}"], tmp_path / "full.log")
    wait_for(lambda: (full / "checkpoints").is_dir(), proc, tmp_path / "full.log")
    startup = time.monotonic() - t0
    assert proc.wait(timeout=300) == 0, (tmp_path / "full.log").read_text()[-3000:]
    step_s = (time.monotonic() - t0 - startup) / 30
    rng, kills = random.Random(14), 0
    while kills < 10:
        proc = launch(common + [f"output.dir={killed}", "training.resume=auto"], log)
        if rng.random() < 0.25:
            time.sleep(rng.uniform(0, startup))
        else:
            newest = (checkpoint.list_checkpoints(killed) or [None])[-1]
            wait_for(lambda newest=newest, proc=proc: (checkpoint.list_checkpoints(killed) or [None])[-1] != newest
                     or proc.poll() == 0, proc, log)
            time.sleep(rng.uniform(0, 3 * step_s))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    proc = launch(common + [f"output.dir={killed}", "training.resume=auto"], log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert_same_adapter(full, killed)
    losses = [(r["step"], r["loss"]) for r in MetricsLog.read(killed / "metrics.csv") if r["loss"]]
    assert losses == [(r["step"], r["loss"]) for r in MetricsLog.read(full / "metrics.csv") if r["loss"]]
    assert not (killed / "train.lock").exists() and checkpoint_names(killed) == ["step-00000029", "step-00000030"]


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(base_overrides, tmp_path, monkeypatch, capsys):
    common = without(base_overrides, "output.dir") + ["training.save_every=2"]
    run(common + [f"output.dir={tmp_path / 'full'}"])
    out, save_file = tmp_path / "run", checkpoint.save_file

    def disk_full_at_step_4(tensors, path, metadata=None):
        if "step-00000004" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", disk_full_at_step_4)
    assert cli_main(["train", *common, f"output.dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"lorakit train: error: could not write the checkpoint of step 4 to {out / 'checkpoints' / 'step-00000004'}: "
        f"No space left on device; the previous checkpoint {out / 'checkpoints' / 'step-00000002'} is intact: make "
        "room and resume with training.resume=auto")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]   # no temporary left either
    monkeypatch.undo()
    run(common + [f"output.dir={out}", "training.resume=auto"])
    assert_same_adapter(tmp_path / "full", out)


def test_an_output_dir_under_a_file_is_refused_before_loading(base_overrides, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(loop, "load_tokenizer", lambda *a: pytest.fail("loaded the tokenizer"))
    with pytest.raises(lk.LoraError, match=rf"output.dir {blocker / 'run'} cannot be written \(.+\); choose a "
                                           r"writable directory for output.dir"):
        run(base_overrides + [f"output.dir={blocker / 'run'}"])


def test_a_read_only_output_dir_is_refused_before_loading(base_overrides, tmp_path, monkeypatch):
    """Tests run as root, whom a chmod does not stop: the file system's answer is faked instead."""
    out, real_open = tmp_path / "run", os.open

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(out)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    monkeypatch.setattr(loop, "load_tokenizer", lambda *a: pytest.fail("loaded the tokenizer"))
    with pytest.raises(lk.LoraError, match=rf"output.dir {out} cannot be written \(Read-only file system\); "
                                           r"choose a writable directory for output.dir"):
        run(base_overrides)
