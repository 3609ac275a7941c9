"""Golden losses: the demo config's (examples/quickstart.yaml) first training losses on CPU, pinned,
so that a change to the numerics of training (the adapter math, the loss, the schedule, the data
order, the built-in model or data) is seen, not only a change that also moves a test's own reference.

Recorded with torch 2.13.0 / transformers 5.23.0 on an AVX-512 CPU, 2 threads, on the code before
the restructuring of issue 13 (commit b714b50); bit for bit the same with 1 thread.

Tolerance: the built-in model is built and pretrained on the machine that runs the tests, so the
CPU's kernels change the base itself, not only the 20 steps. Rerun with AVX2 kernels instead of
AVX-512 (ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 and a fresh
$LORAKIT_CACHE: the kind of change another torch version or CPU brings), the losses moved by up to
9.5e-4 relative (2.2e-4 at the first step), so rtol 1e-3 would be too tight; rtol 5e-3 leaves 5x
that, while a real change of the numerics (a learning rate off by 10%, another scaling, another
data order) moves these losses by percent within the 20 steps.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lorakit.cli import main as cli_main

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml"
RTOL = 5e-3   # see the module docstring

# steps 1..20
QUICKSTART_LOSSES = [
    6.037229537963867, 6.175649166107178, 6.0833516120910645, 5.362691402435303, 5.556663513183594,
    5.784329414367676, 5.369301795959473, 5.233039855957031, 4.835468769073486, 3.782381772994995,
    4.225611686706543, 4.305564880371094, 3.313660144805908, 3.5995259284973145, 3.059818744659424,
    2.989010810852051, 2.856593370437622, 2.1039648056030273, 1.8839993476867676, 1.896021842956543,
]


def test_quickstart_first_20_losses(tmp_path):
    """`lorakit train examples/quickstart.yaml training.max_steps=20` (all 20 steps are warmup).
    Evaluation cannot be switched off for the built-in data (it brings its own eval split), so it
    runs on one record: the training losses do not depend on it (no dropout; the data order has its
    own generator), the same bit for bit as with the whole eval split."""
    one = tmp_path / "eval.jsonl"
    one.write_text(json.dumps({"messages": [{"role": "user", "content": "Is 7 even or odd?"},
                                            {"role": "assistant", "content": "odd"}]}) + "\n")
    out = tmp_path / "run"
    assert cli_main(["train", str(QUICKSTART), "training.max_steps=20", f"data.eval={one}",
                     "output.tensorboard=false", f"output.dir={out}"]) == 0
    with open(out / "metrics.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f) if r["loss"]]
    assert losses == pytest.approx(QUICKSTART_LOSSES, rel=RTOL, abs=0)
