"""Offline references for the serving tests, run as a subprocess (one torch thread): what
`lorakit generate` prints for each job, through the same functions (`load_for_inference`,
`generate_text`; greedy, fp32, CPU). Reads {"model", "jobs": [...]} on stdin, writes one JSON
line: [{"text", "tokens", "eos"}] in job order."""

from __future__ import annotations

import json
import sys

import torch

from lorakit.verbs.generate import generate_text, load_for_inference


def _count_new_tokens(model) -> None:
    """Record, on `model`, how many tokens each `generate` call added (`new_tokens`, the end token
    included, as the server counts them) and whether the last was the end token (`ended`):
    generate_text returns only the text."""
    generate = model.generate

    def counting(*args, **kwargs):
        out = generate(*args, **kwargs)
        model.new_tokens = out.shape[1] - kwargs["input_ids"].shape[1]
        model.ended = int(out[0, -1]) == kwargs["eos_token_id"]
        return out

    model.generate = counting


def main() -> None:
    torch.set_num_threads(1)
    spec = json.loads(sys.stdin.read())
    loaded: dict = {}
    results = []
    for job in spec["jobs"]:
        key = job["adapter"]
        if key not in loaded:
            loaded[key] = load_for_inference(spec["model"], [key] if key else [], dtype="fp32", device="cpu")
            _count_new_tokens(loaded[key][0])
        model, tokenizer = loaded[key]
        text = generate_text(model, tokenizer, prompt=job.get("prompt"), messages=job.get("messages"),
                             max_new_tokens=job["max_new_tokens"])
        results.append({"text": text, "tokens": model.new_tokens, "eos": model.ended})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
