"""Autograd functions the adapter layers call. Each has a plain-PyTorch body, which is the
CPU path and the reference for any device kernel."""

from .dropout_bits import pack_bits, unpack_bits
from .lora_linear import lora_linear_

__all__ = ["lora_linear_", "pack_bits", "unpack_bits"]
