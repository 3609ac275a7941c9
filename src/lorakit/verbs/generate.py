"""`lorakit generate` and `lorakit chat`: text from a base model with one or more adapters (summed)
or from a merged model directory; greedy or sampled, streamed token by token."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

import torch
from transformers import TextStreamer

from ..errors import LoraError
from ..inject import set_active_adapters
from ..io import base_model_of, load_adapter
from ..model_io import encode_prompt, load_model, load_tokenizer


def load_for_inference(model: str | None, adapters: list[str], dtype: str = "auto", device: str = "auto",
                       attn_implementation: str = "auto"):
    """(model, tokenizer): `model` (or the first adapter's base) with every adapter loaded and active;
    `attn_implementation` as for `lorakit.model_io.load_model` (auto: transformers' choice)."""
    if model is None:
        if not adapters:
            raise LoraError("give --model (a model directory or hub id) or at least one --adapter")
        model = base_model_of(adapters[0], "--model")
    net = load_model(model, dtype=dtype, device=device, attn_implementation=attn_implementation)
    tokenizer_source = adapters[0] if adapters and _has_tokenizer(adapters[0]) else model
    tokenizer = load_tokenizer(tokenizer_source)
    names = []
    for i, path in enumerate(adapters):
        name = f"adapter{i}"
        load_adapter(net, path, name=name, activate=False)
        names.append(name)
    if names:
        set_active_adapters(net, names)
    return net.eval(), tokenizer


def _has_tokenizer(path: str) -> bool:
    return (Path(path) / "tokenizer_config.json").is_file()


def generate_text(model, tokenizer, prompt: str | None = None, messages: list[dict] | None = None,
                  max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                  stream: TextIO | None = None) -> str:
    """Continue `prompt` (raw text) or answer `messages` (through the chat template). Temperature 0
    is greedy. With `stream`, text is written there as it is produced."""
    ids = torch.tensor([encode_prompt(tokenizer, prompt, messages)])
    if seed is not None:
        torch.manual_seed(seed)
    ids = ids.to(model.device)
    sampling = temperature > 0
    streamer = _Streamer(tokenizer, stream) if stream is not None else None
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=sampling, temperature=temperature if sampling else None,
                             top_p=top_p if sampling else None, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, streamer=streamer)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


class _Streamer(TextStreamer):
    def __init__(self, tokenizer, stream: TextIO) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stream = stream

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.stream.write(text + ("\n" if stream_end else ""))
        self.stream.flush()


def chat_loop(model, tokenizer, inp: TextIO | None = None, out: TextIO | None = None, system: str | None = None,
              **generation) -> None:
    """Read user turns line by line (EOF or /exit ends), answer each with the history so far."""
    inp, out = inp or sys.stdin, out or sys.stdout
    messages = [{"role": "system", "content": system}] if system else []
    while True:
        out.write("> ")
        out.flush()
        line = inp.readline()
        if not line or line.strip() == "/exit":
            out.write("\n")
            return
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        reply = generate_text(model, tokenizer, messages=messages, stream=out, **generation)
        messages.append({"role": "assistant", "content": reply})
