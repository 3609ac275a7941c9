"""`lorakit VERB ...`: one verb, one function.

Verbs here: `inspect` (what a saved adapter holds). Training, merging and serving verbs join as
their modules land (see the README's roadmap).
"""

from __future__ import annotations

import argparse
import sys

from . import __version__


def inspect_adapter(path: str) -> int:
    """Print a saved adapter's config and tensors: a quick check before loading it anywhere."""
    from .io import read_adapter_config, read_adapter_weights

    config = read_adapter_config(path)
    tensors = read_adapter_weights(path)
    total = sum(t.numel() for t in tensors.values())
    targets = config.target_modules
    shown = targets if isinstance(targets, str) else f"{len(targets or [])} modules"
    print(f"adapter {path}: r={config.r} lora_alpha={config.lora_alpha} use_rslora={config.use_rslora} "
          f"use_dora={config.use_dora} target_modules={shown}")
    print(f"{len(tensors)} tensors, {total:,d} parameters, dtypes {sorted({str(t.dtype) for t in tensors.values()})}")
    for key in sorted(tensors)[:8]:
        print(f"  {key} {tuple(tensors[key].shape)}")
    if len(tensors) > 8:
        print(f"  ... {len(tensors) - 8} more")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning toolkit (PEFT-compatible).")
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("inspect", help="show what a saved adapter directory holds")
    p.add_argument("adapter_dir")
    args = parser.parse_args(argv)
    try:
        if args.verb == "inspect":
            return inspect_adapter(args.adapter_dir)
    except (ValueError, FileNotFoundError) as e:
        print(f"lorakit {args.verb}: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
