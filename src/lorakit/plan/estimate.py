"""Peak training memory in closed form, for LoRA, QLoRA and full fine-tuning.

    peak = frozen weights + trained state + stored activations + max(loss head, recompute)

- Frozen weights: every frozen parameter and buffer in the weight dtype. QLoRA: the decoder's
  linear weights in NF4 (4-bit codes, an 8-bit absmax per 64 weights and an fp32 constant per 256
  absmax: 4.127 bits), everything else in bf16, plus one dequantized copy of the largest matrix.
- Trained state: weights + gradients + AdamW's two moments, 4x each trainable parameter's bytes
  (lorakit keeps adapters in fp32: 16 bytes per parameter). Full fine-tuning: 16 bytes per
  parameter (bf16 weight and gradient, fp32 master copy and moments; ZeRO paper, section 3.1).
- Stored activations: the tensors autograd keeps for backward at the end of the forward, counted
  op by op for the transformers implementation (below), at N = micro batch x sequence tokens.
- Loss head: the logits in the compute dtype and, in `lorakit.train.loss.loss_sum`, the shifted
  logits flattened to fp32 and their log-softmax; in backward the log-softmax output, its gradient
  and the gradient of its input (3 x N x vocab x 4 bytes, usually the larger). With
  `training.chunked_loss` (lorakit.ops.chunked_ce) no full logits exist: the copy of the labelled
  rows of the head's input and their gradient, made in forward (2 x N x hidden x cd), plus one
  chunk's logits in fp32 (and in the compute dtype first, under bf16) with the log-softmax's; with
  lorakit's Triton cross-entropy only the chunk's logits in the compute dtype, turned in place
  into their gradient.
- Recompute: with gradient checkpointing the stored activations are each layer's input, and the
  backward of a layer first recomputes that layer; without, the backward of a layer only adds
  transient gradients. The loss head is freed before the first layer's backward, so the peak
  takes the larger of the two, not their sum.
- Offloaded activations (`training.offload_activations`, CUDA, with checkpointing): transformers
  moves what each checkpointed layer keeps, its input (layers x N x hidden in the residual
  stream's dtype), to pinned host memory and copies it back for that layer's recompute. The device
  keeps one such input during a layer's backward; the host holds them all (`Estimate.host`).
- FSDP2 (`training.strategy: fsdp`, `Sharding`): every process holds a 1/P shard of each
  parameter, split along dim 0 and rounded up (frozen weights, adapters and so their gradients and
  AdamW state), plus the unsharded copies of the groups in use at the peak (`Estimate.gathered`):
  the root group (everything outside the decoder layers: embeddings, final norm, head), which
  FSDP2 keeps unsharded from the forward to the end of the backward, and two decoder layers (the
  one computing and the one prefetched). Buffers are not sharded; activations are the process's
  own micro-batch. A 2-process CPU run of a tiny model whose weights dominate peaks 1.4% above
  this (tests/test_plan_issue15.py).

What one Llama-style decoder layer stores for backward with LoRA (N tokens, compute dtype cd
bytes; measured with `saved_tensors_hooks` on transformers 5, sdpa; a frozen linear keeps no input):

    RMSNorm (x2)        its fp32 input and 1/rms                       N (4h + 4)    when gradients flow
                        (lorakit's Triton kernel: its input as given and 1/rms, N (h wb + 4))
    q/k/v/gate/up/down  the input of each adapted group                N h cd, N I cd (down)
                        unless the adapters rebuild it in backward (lorakit.ops.recompute): the
                        norm outputs from the norm's kept input (when gradients flow into the
                        norm and it keeps that very tensor: fp32 weights, or LayerNorm), the MLP
                        product from its kept factors (when gradients flow and gate/up are adapted)
    each adapter        x A^T                                          N r cd
    attention           q, k, v after rope, the output, log-sum-exp    N (2 q + 2 kv) cd + B heads T 4
      with a mask (padded or packed rows), sdpa gets repeat_kv copies (kv -> q) and a B T T mask
      in the compute dtype per layer; eager attention keeps the fp32 and cd probabilities instead
    MLP (SwiGLU)        gate output, its activation, up output          3 N I cd
                        (lorakit's Triton kernel: gate and up outputs,  2 N I cd)
    full fine-tuning adds each norm's normalised input (for the norm weight) and the head's input.

GPT-2 is modelled likewise (LayerNorm keeps mean and rstd, the fused c_attn output is one storage,
gelu_new keeps 4 N I tensors, dropout keeps its mask: float on CPU, bool on CUDA). Other
architectures use the Llama layer (marked approximate).

Objectives other than sft (`training.objective`, `Forwards`): the forward with gradients is an SFT
forward of the objective's rows (lorakit.train.preference, lorakit.train.grpo), so the model above
counts it at N = micro batch x rows per example x row length:

    dpo, ipo, simpo, orpo   2 rows a pair (chosen, then rejected) of max_seq_len
    kto                     1 row a completion of max_seq_len (its KL rows pair a prompt with another
                            example's completion, so a batch can be wider: up to 2 max_seq_len - 2)
    grpo                    group_size rows a prompt, of max_seq_len - 1 + max_completion_len (a prompt
                            is shorter than max_seq_len, a completion at most max_completion_len)

- Loss head: the completions' log-probabilities (lorakit.train.logprobs) rather than the loss, the
  same tensors as the chunked loss (the scored rows' hidden and its gradient, one chunk's fp32 logits
  and log-softmax; no Triton kernel) or, with full logits, the logits, their tempered fp32 copy and
  its log-softmax (3 x its size in backward).
- No-grad forwards (`Estimate.reference`): the reference (the base with the adapter off: dpo, ipo,
  kto, grpo with beta > 0; none with preference.precompute_reference) and kto's KL rows run in the
  step while the grad forward's activations are kept, and so does the (n, d) gradient (full logits:
  the log-softmax) its log-probabilities keep. Such a forward keeps nothing; its peak is the widest
  point of one layer or of the head, measured on CPU with transformers 5 (`no_grad_forward`): the
  embedding output (which the model's forward holds), the layer's input, the residual and the norm
  output, with the MLP's act(gate), up and their product (gelu_new: 4 N I), or attention's q, k, v
  and rope's three temporaries of q (sdpa with a mask: its bool mask for the whole forward, the
  repeat_kv copies and the mask in the compute dtype; eager: the scores and probabilities).
- Sampling (grpo, before the training forward, so not alive with its activations; the peak takes
  the larger): the KV cache, 2 (K and V) x layers x kv_dim x rows x row length in the compute dtype,
  and the larger of the prompts' prefill (a no-grad forward) and one decoding step's rows x vocab
  tensors (`sampling`). Prompts are taken at max_seq_len - 1 tokens and completions at full length:
  a bound, as max_seq_len is for SFT rows.
- Full fine-tuning has no adapter to switch off: a reference there is a second copy of the
  weights, counted in its frozen weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..ops.chunked_ce import default_chunk_rows

NF4_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8
FULL_FT_BYTES = 16
CUDA_RESERVE = 2**30
"""Held back from the memory budget on CUDA: the CUDA context and cuBLAS workspaces, which
`torch.cuda.max_memory_allocated` does not count (an assumption, not measured here)."""
METHODS = ("lora", "qlora", "full")
METHOD_LABELS = {"lora": "LoRA", "qlora": "QLoRA", "full": "full"}
"""How the plan's table and messages name each method."""


@dataclass(frozen=True)
class Arch:
    """The dimensions the memory model needs, read from the model config."""

    family: str
    """"llama" (RMSNorm, q/k/v/o, gated MLP) or "gpt2"."""
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    act_saved: int
    """Tensors of N x intermediate the MLP activation keeps: 3 for SwiGLU/GeGLU, 4 for gelu_new."""
    act_grads: int
    """Gradients of N x intermediate alive at once in the MLP's backward: 1 for SwiGLU, 2 for
    gelu_new's chain of elementwise ops (measured on CPU)."""
    resid_dropout: float = 0.0
    attn_dropout: float = 0.0

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


@dataclass(frozen=True)
class LayerAdapters:
    """The LoRA ranks on one decoder layer, by where their input sits in the layer."""

    qkv: tuple[int, ...] = ()
    o: tuple[int, ...] = ()
    up: tuple[int, ...] = ()
    down: tuple[int, ...] = ()
    other: tuple[tuple[int, int], ...] = ()
    """(d_in, r) of adapted modules the layer model does not place (approximate)."""
    experts: tuple[int, ...] = ()
    """Weights of each adapted fused expert stack: the forward reads W + the update, a tensor of
    the stack's size that autograd keeps for the experts' backward (lorakit.param_layer)."""


@dataclass(frozen=True)
class Trainables:
    """Where a LoRA run trains, as the activation model sees it."""

    layers: tuple[LayerAdapters, ...]
    embedding: tuple[int, ...] = ()
    """LoRA ranks on the input embedding."""
    head: tuple[int, ...] = ()
    """LoRA ranks on the output head."""
    head_full: bool = False
    """The output head trains in full (modules_to_save)."""
    from_start: bool = False
    """Something before the first layer trains (an embedding copy, biases): gradients flow through
    every layer."""
    dropout: bool = False
    """The adapters use dropout: each keeps its mask as bits, and backward unpacks one at a time."""


@dataclass(frozen=True)
class Forwards:
    """What the forwards of one micro-batch of `training.objective` run, per example of it (an SFT
    row, a pair, a kto completion, a grpo prompt); the module docstring has the layouts."""

    objective: str = "sft"
    """training.objective."""
    rows: int = 1
    """Rows of the forward with gradients: 2 for a pair, grpo.group_size for a prompt."""
    reference_rows: int = 0
    """Rows the reference scores in a no-grad forward within the step (0: none)."""
    scoring_rows: int = 0
    """Rows the trained policy scores in a no-grad forward within the step (kto's KL rows)."""
    sampled: int = 0
    """grpo: tokens sampled per completion with the KV cache (grpo.max_completion_len); 0: none."""
    top_p: float = 1.0
    """grpo.top_p: below 1, sampling sorts each step's logits first."""


@dataclass(frozen=True)
class Workload:
    """One micro-batch and the precision it runs in."""

    batch: int
    """Examples in the micro-batch (training.micro_batch_size): rows for sft, pairs, prompts."""
    seq: int
    weight_bytes: int
    """Bytes per weight element (2: bf16/fp16, 4: fp32); also the residual stream's dtype."""
    compute_bytes: int
    """Bytes per activation element: 2 under bf16 autocast or with 16-bit weights, else 4."""
    device: str = "cuda"
    attention: str = "sdpa"
    """transformers attn_implementation: sdpa, eager or flash_attention_2."""
    masked: bool = True
    """Rows are padded or packed, so sdpa gets an attention mask."""
    chunked_loss: bool = False
    """The loss comes from the head's input a chunk of rows at a time (training.chunked_loss)."""
    kernel_norms: bool = False
    """lorakit's Triton RMSNorm (training.kernels): keeps only its input, as given, and 1/rms, so
    the adapters reading its output rebuild it from that input whatever the dtype."""
    kernel_mlp: bool = False
    """lorakit's Triton SwiGLU product: keeps gate and up, not silu(gate)."""
    kernel_loss: bool = False
    """lorakit's Triton cross-entropy in the chunked loss: a chunk's logits become their gradient
    in place, in the compute dtype (no fp32 copy, no log-softmax)."""
    offload: bool = False
    """training.offload_activations on CUDA: with checkpointing, the layers' inputs are in host memory."""
    forwards: Forwards = Forwards()
    """The forwards the objective runs (sft: one, with gradients, of `batch` rows)."""


@dataclass
class Estimate:
    """Predicted peak bytes of one training setup (a method, with or without checkpointing)."""

    method: str
    checkpointing: bool
    frozen_weights: int
    trained_state: int
    """Trainable weights + gradients + optimizer state."""
    activations: int
    """Stored for backward at the end of the forward."""
    loss_logits: int
    recompute: int
    """One layer's recompute and backward transients (checkpointing), or the backward transients."""
    gathered: int = 0
    """FSDP2: the unsharded copies of the parameter groups in use at the peak (`Sharding`)."""
    host: int = 0
    """Host memory the offloaded activations take (training.offload_activations); not in `total`."""
    reference: int = 0
    """The no-grad forwards within the step (the reference, kto's KL rows) at their peak, with what
    the grad forward's log-probabilities keep meanwhile; after its forward, as the loss head is."""
    kv_cache: int = 0
    """grpo: the KV cache of sampling the completions, before the forward with gradients."""
    sampling: int = 0
    """grpo: sampling's other peak tensors, next to the KV cache (prefill or a decoding step)."""
    total: int = field(init=False)
    """Peak device bytes."""

    def __post_init__(self) -> None:
        step = self.activations + max(self.loss_logits, self.recompute, self.reference)
        self.total = (self.frozen_weights + self.trained_state + self.gathered
                      + max(step, self.kv_cache + self.sampling))


@dataclass(frozen=True)
class Weights:
    """Parameter counts and bytes of the model, split the way the methods treat them."""

    frozen_bytes: int
    """Frozen parameters and buffers in the weight dtype (the LoRA run)."""
    trained_bytes: int
    """Trainable parameters' bytes (each in its own dtype) in the LoRA run."""
    base_params: int
    """Parameters of the base model (trained in full fine-tuning)."""
    buffer_bytes: int
    quantizable_params: int
    """Decoder linear weights (what bitsandbytes quantizes for QLoRA; not the output head)."""
    largest_matrix: int
    """Elements of the largest quantizable weight (dequantized one at a time in QLoRA)."""


@dataclass(frozen=True)
class Sharding:
    """What one of `processes` FSDP2 processes holds of the LoRA run's parameters (module docstring);
    `lorakit.train.distributed` shards each decoder layer, then the root group."""

    processes: int
    frozen_shard: int
    """Bytes of one process's shards of the frozen parameters."""
    trained_shard: int
    """Bytes of one process's shards of the trainable parameters."""
    base_shard: int
    """Base-model parameters in one process's shards (full fine-tuning trains them all)."""
    frozen_gathered: int
    """Bytes of the frozen parameters of the root group and of the two largest decoder layers."""
    trained_gathered: int
    """Bytes of the trainable parameters of the same groups."""
    base_gathered: int
    """Base-model parameters of the same groups."""


# ---- activations ------------------------------------------------------------------------------


def _mask_bytes(w: Workload) -> int:
    """Bytes per element of a dropout mask: torch keeps a float noise tensor on CPU, a bool on CUDA."""
    return w.compute_bytes if w.device == "cpu" else 1


def _attention(a: Arch, w: Workload, out_kept: bool) -> int:
    """What attention keeps for backward when gradients flow through it. `out_kept`: the output
    projection keeps its input (adapted or trained), which the fused kernels keep anyway."""
    n, cd, b, t = w.batch * w.seq, w.compute_bytes, w.batch, w.seq
    repeated = a.kv_heads != a.heads
    if w.attention == "eager":
        kv = a.q_dim if repeated else a.kv_dim               # eager always calls repeat_kv
        probs = b * a.heads * t * t * (4 if cd == 4 else 4 + cd)   # fp32 softmax, then its cd copy
        return n * (a.q_dim + 2 * kv) * cd + probs + (n * a.q_dim * cd if out_kept else 0)
    masked = w.masked and w.attention == "sdpa"
    math_kernel = a.attn_dropout > 0 and w.device == "cpu"   # CPU sdpa has no fused kernel with dropout
    kv = a.q_dim if masked and repeated else a.kv_dim          # repeat_kv when sdpa gets a mask
    qkv = 3 * a.q_dim if a.family == "gpt2" else a.q_dim + 2 * kv   # GPT-2: one fused c_attn storage
    if math_kernel:   # probabilities, the dropout mask and the dropped probabilities (the mask is only added)
        out = n * a.q_dim * cd if out_kept else 0
        return n * qkv * cd + 3 * b * a.heads * t * t * cd + out
    mask = b * t * t * cd if masked else 0                  # converted to the compute dtype in each layer
    return n * (qkv + a.q_dim) * cd + b * a.heads * t * 4 + mask   # + the output and log-sum-exp


def _norm(a: Arch, w: Workload, n: int) -> int:
    """A norm's fp32 input plus its statistics (1/rms; LayerNorm: mean and rstd); the Triton
    RMSNorm keeps the input in its own dtype (the residual stream's) and 1/rms."""
    if w.kernel_norms and a.family != "gpt2":
        return n * (a.hidden * w.weight_bytes + 4)
    return n * (a.hidden * 4 + (8 if a.family == "gpt2" else 4))


def _rebuilt_norm_output(a: Arch, w: Workload, grad: bool) -> bool:
    """Adapters reading a norm's output rebuild it in backward from the input the norm keeps."""
    return grad and (w.weight_bytes == 4 or a.family == "gpt2" or w.kernel_norms)


def _layer(a: Arch, w: Workload, ad: LayerAdapters | None, grad: bool,
           dropout: bool = False) -> tuple[int, bool, int]:
    """Bytes one decoder layer stores for backward, whether gradients flow out of it, and the
    bytes its backward rebuilds for a while (the MLP's input, from its kept factors or its
    activation's input: with GPT-2's gelu, two temporaries of that size; with `dropout`, an
    adapter's unpacked mask, its multiplier and the dropped input). `ad` None is full
    fine-tuning; `grad`: gradients flow into the layer's input."""
    n, cd = w.batch * w.seq, w.compute_bytes
    full = ad is None
    ad = ad or LayerAdapters()
    # for an RMSNorm weight's gradient (the Triton norm recomputes it from its input)
    norm_out = n * a.hidden * cd if full and a.family != "gpt2" and not w.kernel_norms else 0
    keep = sum(n * r * cd for r in ad.qkv + ad.o + ad.up + ad.down) + sum(n * (d + r) * cd for d, r in ad.other)
    keep += sum(ad.experts) * cd
    widths = ([a.hidden] * len(ad.qkv + ad.up) + [a.q_dim] * len(ad.o) + [a.intermediate] * len(ad.down)
              + [d for d, _ in ad.other])   # d_in of each adapter
    if dropout:
        keep += sum(n * d // 8 for d in widths)                        # the masks' bits
    grad = grad or full or bool(ad.other)
    if grad:
        keep += _norm(a, w, n)
    keep += norm_out
    if full or (ad.qkv and not _rebuilt_norm_output(a, w, grad)):
        keep += n * a.hidden * cd
    grad = grad or bool(ad.qkv)
    if grad:
        keep += _attention(a, w, bool(ad.o) or full)
    elif ad.o:
        keep += n * a.q_dim * cd
    grad = grad or bool(ad.o)
    if grad and a.resid_dropout > 0:
        keep += n * a.hidden * _mask_bytes(w)
    if grad:
        keep += _norm(a, w, n)
    keep += norm_out
    if full or (ad.up and not _rebuilt_norm_output(a, w, grad)):
        keep += n * a.hidden * cd
    grad = grad or bool(ad.up) or bool(ad.experts)   # the experts read the MLP's input, as up does
    if grad:
        act_saved = a.act_saved - 1 if w.kernel_mlp and a.family != "gpt2" else a.act_saved   # no silu(gate)
        keep += act_saved * n * a.intermediate * cd
    rebuilt_mlp = grad and (a.family == "gpt2" or bool(ad.up))   # from the activation's kept input / factors
    if full or (ad.down and not rebuilt_mlp):
        keep += n * a.intermediate * cd
    rebuilt = n * a.intermediate * cd * (2 if a.family == "gpt2" else 1) if ad.down and rebuilt_mlp else 0
    if dropout and widths:
        rebuilt = max(rebuilt, n * max(widths) * (1 + 2 * cd))
    grad = grad or bool(ad.down)
    if grad and a.resid_dropout > 0:
        keep += n * a.hidden * _mask_bytes(w)
    return keep, grad, rebuilt


def activations(a: Arch, w: Workload, train: Trainables | None, checkpointing: bool) -> tuple[int, int]:
    """(stored activations, recompute and backward transients) in bytes; `train` None is full
    fine-tuning."""
    n, cd, b, t = w.batch * w.seq, w.compute_bytes, w.batch, w.seq
    full = train is None
    indices = b * t * 8                                    # the embedding's backward keeps the ids
    keep = 0
    grad = full or train.from_start or bool(train.embedding)
    if full:
        keep += indices
        if a.resid_dropout > 0:                            # GPT-2's embedding dropout
            keep += n * a.hidden * _mask_bytes(w)
    elif train.embedding:
        keep += indices + sum(n * r * cd for r in train.embedding)
    layers = [None] * a.layers if full else list(train.layers)
    per_layer, rebuilt = [], 0
    for ad in layers:
        stored, grad, rebuilt_here = _layer(a, w, ad, grad, not full and train.dropout)
        per_layer.append(stored)
        rebuilt = max(rebuilt, rebuilt_here)
    head_in = n * a.hidden * cd
    if grad:
        keep += _norm(a, w, n)
        if a.family != "gpt2":
            keep += 2 * t * a.head_dim * cd                 # rope cos and sin, shared by the layers
    if full:
        keep += head_in + (head_in if a.family != "gpt2" else 0)   # head input; the final RMSNorm's output
    elif train.head:
        keep += head_in + sum(n * r * cd for r in train.head)
    elif train.head_full:
        keep += head_in
    transient = n * (a.hidden + a.act_grads * a.intermediate) * cd + rebuilt   # gradients in flight through a layer
    if not checkpointing:
        return keep + sum(per_layer), transient
    if w.offload:   # the inputs are in host memory; one is copied back for its layer's recompute
        return keep, max(per_layer, default=0) + transient + checkpointed_inputs(a, w) // a.layers
    return keep + checkpointed_inputs(a, w), max(per_layer, default=0) + transient


def checkpointed_inputs(a: Arch, w: Workload) -> int:
    """Bytes of what gradient checkpointing keeps of the decoder layers: each layer's input, in the
    residual stream's dtype (what training.offload_activations moves to host memory)."""
    return a.layers * w.batch * w.seq * a.hidden * w.weight_bytes


def loss_head(a: Arch, w: Workload) -> int:
    """Peak bytes of the logits and the loss (see the module docstring); for an objective other than
    sft (`w` its grad forward, `grad_forward`), of the completions' log-probabilities."""
    n, shifted, v = w.batch * w.seq, w.batch * (w.seq - 1), a.vocab
    if w.forwards.objective != "sft":   # lorakit.train.logprobs: no Triton kernel, no fp32 copy of the chunk
        if w.chunked_loss:
            return 2 * n * a.hidden * w.compute_bytes + min(shifted, default_chunk_rows(shifted, v, a.hidden)) * v * 8
        return max(n * v * w.compute_bytes + 8 * shifted * v, 12 * shifted * v)
    if w.chunked_loss:
        chunk = min(shifted, default_chunk_rows(shifted, v, a.hidden))
        if w.kernel_loss:
            return 2 * n * a.hidden * w.compute_bytes + chunk * v * w.compute_bytes
        upcast = w.compute_bytes if w.compute_bytes != 4 else 0   # fp32 logits are not copied
        return 2 * n * a.hidden * w.compute_bytes + chunk * v * (8 + upcast)
    copy = shifted * v * 4 if (w.batch > 1 or w.compute_bytes != 4) else 0   # B = 1 in fp32 is a view
    forward = n * v * w.compute_bytes + copy + shifted * v * 4
    backward = 3 * shifted * v * 4
    return max(forward, backward)


# ---- the objectives' forwards (module docstring) -----------------------------------------------------


def row_length(w: Workload) -> int:
    """Tokens in a row of the objective's forwards: max_seq_len, or for grpo a prompt (shorter than
    max_seq_len) and its sampled completion."""
    return w.seq - 1 + w.forwards.sampled if w.forwards.sampled else w.seq


def grad_forward(w: Workload) -> Workload:
    """The forward with gradients of the objective's micro-batch, as a workload of its rows."""
    return dataclasses.replace(w, batch=w.batch * w.forwards.rows, seq=row_length(w))


def _no_grad_layer(a: Arch, w: Workload) -> int:
    """The widest point of one decoder layer in a forward without gradients of `w`'s rows."""
    n, cd, wb, b, t = w.batch * w.seq, w.compute_bytes, w.weight_bytes, w.batch, w.seq
    gpt2, repeated = a.family == "gpt2", a.kv_heads != a.heads
    stream = (3 if a.layers > 1 else 2) * n * a.hidden * wb          # embedding output, layer input, norm output
    rope = 0 if gpt2 else n * (4 * a.q_dim + 2 * a.kv_dim) * cd      # q, k, v, q cos, rotate_half(q), its sin
    qkv = 3 * a.q_dim if gpt2 else a.q_dim + 2 * a.kv_dim            # after rope; GPT-2: the fused c_attn output
    copies = 2 * a.q_dim if repeated else 0                          # repeat_kv's
    mask = 0                                                         # what the model's forward holds throughout
    if w.attention == "eager":                                       # its mask in cd; the scores, their fp32 softmax
        mask = b * t * t * cd
        attend = n * (qkv + copies) * cd + b * a.heads * t * t * (4 + cd)
    elif w.masked:                                                   # sdpa: its bool mask; the layer's cd copy,
        mask = b * t * t if w.attention == "sdpa" else 0             # the output and log-sum-exp
        attend = n * (qkv + copies + a.q_dim) * cd + b * t * t * cd + b * a.heads * t * 4
    else:                                                            # the output and log-sum-exp
        attend = n * (qkv + a.q_dim) * cd + b * a.heads * t * 4
    # the MLP: also the residual (and GPT-2's attention output, which its block holds)
    mlp = stream + (2 if gpt2 else 1) * n * a.hidden * wb + a.act_saved * n * a.intermediate * cd
    return mask + max(stream + max(rope, attend), mlp)


def _no_grad_head(a: Arch, w: Workload) -> int:
    """Peak of the log-probabilities of `w`'s rows without gradients (lorakit.train.logprobs)."""
    n, shifted, v = w.batch * w.seq, w.batch * (w.seq - 1), a.vocab
    if w.chunked_loss:   # the final norm's output, the scored rows' copy, one chunk's logits and log-softmax
        chunk = min(shifted, default_chunk_rows(shifted, v, a.hidden))
        return n * a.hidden * (w.weight_bytes + w.compute_bytes) + chunk * v * 8
    return n * v * w.compute_bytes + 8 * shifted * v                    # logits, their tempered fp32 copy, log-softmax


def no_grad_forward(a: Arch, w: Workload) -> int:
    """Peak bytes of a forward without gradients of `w`'s rows, scoring every position: what it
    holds at the widest point of a layer or of the head (it keeps nothing)."""
    return max(_no_grad_layer(a, w), _no_grad_head(a, w))


def no_grad_forwards(a: Arch, w: Workload) -> int:
    """`Estimate.reference`: the largest no-grad forward of the step (the reference's, kto's KL
    rows'), with the gradient (full logits: the log-softmax) the grad forward's log-probabilities
    keep for backward meanwhile; 0 when the step runs none."""
    f, g = w.forwards, grad_forward(w)
    rows = [r for r in (f.reference_rows, f.scoring_rows) if r]
    if not rows:
        return 0
    kept = g.batch * g.seq * a.hidden * g.compute_bytes if g.chunked_loss else g.batch * (g.seq - 1) * a.vocab * 4
    return kept + max(no_grad_forward(a, dataclasses.replace(g, batch=w.batch * r)) for r in rows)


def kv_cache(a: Arch, w: Workload) -> int:
    """grpo: the KV cache of sampling every completion of the micro-batch to full length: K and V of
    each layer, rows x (prompt + max_completion_len) positions, in the compute dtype; 0 without sampling."""
    if not w.forwards.sampled:
        return 0
    g = grad_forward(w)
    return 2 * a.layers * a.kv_dim * g.batch * g.seq * w.compute_bytes


def sampling(a: Arch, w: Workload) -> int:
    """grpo: the larger of the prompts' prefill (a no-grad forward of the rows' prompts, without the
    head: only the last position's logits) and one decoding step, beyond the KV cache; 0 without
    sampling. A step holds, rows x vocab each: the logits (compute dtype), `generate`'s fp32 copy
    and the previous step's scores, while GumbelSampler makes the tempered logits and the noise
    on the same device in fp32 (the rows' uniforms and their stack, a temporary of the transform,
    the sum: 20 bytes an element with the tempered logits, measured on CPU); with grpo.top_p < 1
    also the sorted probabilities, their int64 order and the mask, which it keeps to the end
    (measured on CPU). Or DynamicCache's copy of one layer's K or V
    as it grows, in the step's forward."""
    f = w.forwards
    if not f.sampled:
        return 0
    rows = w.batch * f.rows
    prefill = _no_grad_layer(a, dataclasses.replace(w, batch=rows, seq=w.seq - 1))
    held = w.compute_bytes + 4 + 4                       # the logits, their fp32 copy, the previous scores
    noise = 5 * 4                                        # the tempered logits and the noise (docstring)
    nucleus = 4 + 8 + 1 if f.top_p < 1 else 0           # sorted probabilities, their order, the mask
    step = max(rows * a.vocab * (held + noise + nucleus), kv_cache(a, w) // (2 * a.layers))
    return max(prefill, step)


# ---- whole runs ------------------------------------------------------------------------------------


def estimate(method: str, checkpointing: bool, a: Arch, w: Workload, weights: Weights,
             train: Trainables, sharding: Sharding | None = None) -> Estimate:
    """The peak of one method ("lora", "qlora" or "full") with or without checkpointing, on each
    process when `sharding` (FSDP2 over several processes; not for QLoRA, which lorakit trains in
    one process only)."""
    s, gathered = sharding, 0
    if method == "full":
        frozen, trained, who = weights.buffer_bytes, FULL_FT_BYTES * weights.base_params, None
        if s:
            trained, gathered = FULL_FT_BYTES * s.base_shard, s.base_gathered * w.weight_bytes
    elif method == "qlora":
        if s:
            raise ValueError("QLoRA is not planned under FSDP2: lorakit trains it in one process")
        rest = weights.frozen_bytes - weights.buffer_bytes - weights.quantizable_params * w.weight_bytes
        frozen = (weights.buffer_bytes + round(weights.quantizable_params * NF4_BYTES)
                  + rest // w.weight_bytes * 2 + weights.largest_matrix * 2)   # non-quantized parts in bf16
        trained, who = 4 * weights.trained_bytes, train
    else:
        frozen, trained, who = weights.frozen_bytes, 4 * weights.trained_bytes, train
        if s:
            frozen, trained = weights.buffer_bytes + s.frozen_shard, 4 * s.trained_shard
            gathered = s.frozen_gathered + s.trained_gathered
    if method == "full" and w.forwards.reference_rows:   # no adapter to switch off: a second copy of the base
        frozen += (s.base_shard if s else weights.base_params) * w.weight_bytes
    g = grad_forward(w)
    stored, recompute = activations(a, g, who, checkpointing)
    host = checkpointed_inputs(a, g) if checkpointing and w.offload else 0
    return Estimate(method, checkpointing, frozen, trained, stored, loss_head(a, g), recompute, gathered, host,
                    no_grad_forwards(a, w), kv_cache(a, w), sampling(a, w))


def usable(budget: int, device: str) -> int:
    """The part of a memory budget tensors can use."""
    return budget - CUDA_RESERVE if device == "cuda" else budget


def largest(fits, low: int, high: int) -> int:
    """The largest value in [low, high] for which `fits(value)` holds (it is monotone), or 0."""
    if not fits(low):
        return 0
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low
