"""The example scripts run, so the README's `make demo` cannot rot."""

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_core_demo_learns_and_round_trips(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["core_demo.py", "--steps", "60", "--out", str(tmp_path / "adapter")])
    runpy.run_path(str(ROOT / "examples" / "core_demo.py"), run_name="__main__")
    out = capsys.readouterr().out
    lines = {line.split(":")[0]: line for line in out.splitlines()}
    acc_before = float(lines["before training"].rsplit(" ", 1)[-1].rstrip("%"))
    acc_after = float(next(v for k, v in lines.items() if k.startswith("after 60 steps")).rsplit(" ", 1)[-1].rstrip("%"))
    assert acc_before < 20 and acc_after > 90, out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    for prefix in ("merged vs unmerged logits", "unloaded to a plain LlamaForCausalLM"):
        err = float(next(line for line in out.splitlines() if line.startswith(prefix)).rsplit(" ", 1)[-1])
        assert err < 1e-5, out
    assert "reloaded: max |diff| 0.0e+00" in out
