"""Triton kernels for CUDA: the Llama family's hot ops and the loss, behind the PyTorch API.

Each kernel module holds an autograd function with the same semantics as the PyTorch code it
replaces (transformers' modules, `lorakit.ops`); that PyTorch code stays the CPU path and the
reference the kernels are tested against. Kernel modules import triton, so they are imported only
when kernels are used (see `use_kernels`); importing `lorakit` never needs triton.

Without a GPU the kernels still run, slowly, in Triton's interpreter (TRITON_INTERPRET=1, set
before triton is first imported): the tests do that on CPU tensors.
"""
