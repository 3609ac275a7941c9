"""bench/bench_gpu.py is written for a CUDA machine the tests rarely have: run its --tiny version on
the CPU (both modes, in subprocesses) so that the script cannot rot unnoticed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_gpu.py"


def run_bench(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}   # one thread: faster than fighting other processes
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def table_rows(out: str, heading: str) -> list[list[str]]:
    """The data rows of the markdown table under `heading`, as lists of cells."""
    rest = out.split(heading, 1)[1].strip().splitlines()
    rows = []
    for line in rest[2:]:                       # after the header and the |---| line
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_timed_cases_run_and_step0_losses_agree():
    out = run_bench("--tiny", "--device", "cpu", "--steps", "1", "--warmup", "0")
    # the script asserts lorakit's and PEFT's step-0 losses agree before printing this
    assert "of PEFT's: checked" in out
    for heading in ("## LoRA: bf16 base", "## QLoRA: 4-bit NF4 base"):
        rows = table_rows(out, heading)
        assert [r[0].split(" [")[0] for r in rows] == [
            "floor (frozen base)", "lorakit", "PEFT + transformers", "lorakit, checkpointing",
            "PEFT + transformers, checkpointing"]
        peft = next(r for r in rows if r[0].startswith("PEFT + transformers ["))
        assert peft[2] == peft[3] == peft[6] == peft[7] == "1.00x"   # PEFT against itself
        assert all(float(r[1].replace(",", "")) > 0 and float(r[5]) > 0 for r in rows)
        assert all(r[8] == "n/a" for r in rows)                        # no peak FLOP/s known for a CPU


@pytest.mark.slow   # a second run of the script; the timed cases above keep it from rotting in the fast suite
def test_max_seq_search_on_a_budget():
    # 9 MiB: lorakit with checkpointing peaks at ~7.6 MiB at 128 tokens, PEFT without it at ~10.3
    out = run_bench("--tiny", "--device", "cpu", "--max-seq", "--no-qlora", "--max-seq-cap", "128",
                    "--budget-gib", str(9 / 1024))
    rows = {r[0]: r for r in table_rows(out, "## longest sequence in 9.0 MiB (batch 1, multiples of 32, searched up to 128)")}
    assert rows["lorakit, checkpointing [bf16]"][1] == ">= 128 (search limit)"
    peft = rows["PEFT + transformers [bf16]"][1]
    assert peft.isdigit() and 32 <= int(peft) < 128 and int(peft) % 32 == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip is for machines without CUDA")
def test_skips_itself_without_cuda():
    out = run_bench()
    assert out.strip() == "bench_gpu: no CUDA device (cpu), skipped; `--tiny` runs a small smoke version on the CPU"
