"""The `lorakit train` configuration: one typed dataclass per YAML section.

    model:     which base model and how to load it
    lora:      the adapter (every `lorakit.LoraConfig` field)
    mixture:   instead of a new adapter, a mixture of experts or AdapterFusion over saved adapters
    data:      files, format, template, masking, truncation, packing
    training:  objective, optimiser, schedule, batch, precision, evaluation, checkpoints, resume
    preference: the settings of the preference objectives (dpo, ipo, simpo, orpo, kto)
    grpo:      the settings of GRPO (sampling, rewards, the clipped policy loss)
    output:    where the run is written and what is exported

Validated once here, at the edge; the rest of the code trusts these objects. A field with a
fixed set of values is a `Literal`: `lorakit.schema.check_choices` checks it, and `--help`, the
CLI's `choices` and the README reference read the values from the type.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, get_args

from ..builtin.names import BUILTIN_DATA, BUILTIN_MODEL
from ..compose.settings import FusionConfig, KindName, MixtureConfig
from ..config import NAME_RE, LoraConfig
from ..dtypes import DtypeChoice, QuantizeBase
from ..errors import ConfigError
from ..schema import check_choices, from_file_and_overrides

DataFormat = Literal["auto", "alpaca", "chat", "sharegpt", "prompt_completion", "text"]
DATA_FORMATS = get_args(DataFormat)
Schedule = Literal["constant", "linear", "cosine"]
Strategy = Literal["single", "ddp", "fsdp"]
KernelChoice = Literal["auto", "triton", "torch"]
TrackerName = Literal["tensorboard", "wandb", "mlflow"]
ObjectiveName = Literal["sft", "dpo", "ipo", "simpo", "orpo", "kto", "grpo"]
PAIRED_OBJECTIVES = ("dpo", "ipo", "simpo", "orpo")
"""Trained on pairs of a chosen and a rejected completion."""
PREFERENCE_OBJECTIVES = (*PAIRED_OBJECTIVES, "kto")
"""The objectives the `preference:` section sets."""
REFERENCE_FREE = ("simpo", "orpo")
"""Preference objectives that compare no reference model."""
REFERENCE_OBJECTIVES = ("dpo", "ipo", "kto", "grpo")
"""The objectives with a reference model (training.reference_adapter)."""
GrpoLoss = Literal["dapo", "grpo", "dr_grpo"]
RewardScale = Literal["group", "none"]
TRACKERS = get_args(TrackerName)


@dataclass
class ModelSection:
    name_or_path: str = BUILTIN_MODEL
    """Hub id or local directory of a causal LM; "lorakit/tiny-llama" is the built-in offline model."""
    dtype: DtypeChoice = "auto"
    """Weight dtype; auto is bf16 where the GPU supports it, else fp32."""
    device: str = "auto"
    """cuda, cpu, cuda:1, ... or auto (cuda if available)."""
    attn_implementation: str = "auto"
    """transformers attention implementation: auto (transformers' choice for the model: sdpa, or eager where the model has no sdpa, as Gemma 2), sdpa, eager, flash_attention_2, ..."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the model."""
    trust_remote_code: bool = False
    """Allow model code from the hub repository (only for models you trust)."""
    quantize_base: QuantizeBase = "none"
    """nf4 (QLoRA): the frozen linear layers in 4-bit NF4 (bitsandbytes), computing in `dtype`."""

    def __post_init__(self) -> None:
        check_choices(self, "model")
        if not self.name_or_path:
            raise ConfigError("model.name_or_path is empty; give a hub id or a local model directory")
        if not self.attn_implementation:
            raise ConfigError(f"model.attn_implementation must be auto or a transformers attention implementation "
                              f"(sdpa, eager, flash_attention_2, ...), got {self.attn_implementation!r}")


@dataclass
class DataSection:
    train: str | list[str] = BUILTIN_DATA
    """Training data: .jsonl/.json/.csv file(s), a `datasets` name, or "lorakit/tiny-tasks" (built in)."""
    eval: str | list[str] | None = None
    """Evaluation data in the same forms; None holds out `eval_fraction` of the training data."""
    eval_fraction: float = 0.0
    """Share of the training data held out for evaluation when `eval` is None."""
    format: DataFormat = "auto"
    """The records' format; auto tells it from each record's keys."""
    columns: dict[str, str] = field(default_factory=dict)
    """Rename columns to the format's names, e.g. {question: instruction, answer: output}."""
    chat_template: str | None = None
    """Jinja chat template for tokenizers without one (or to replace theirs)."""
    system_prompt: str | None = None
    """A system message put before every conversation that has none."""
    train_on_inputs: bool = False
    """Train on prompts too; by default only assistant turns (with their end-of-turn token) count."""
    max_seq_len: int = 512
    """Longer samples are truncated (the count is reported)."""
    packing: bool = False
    """Pack several samples per row, with no attention across samples and positions restarting."""
    max_samples: int | None = None
    """Use at most this many training samples (after shuffling with the seed)."""

    def __post_init__(self) -> None:
        check_choices(self, "data")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction!r}")
        if self.max_seq_len < 2:
            raise ConfigError(f"data.max_seq_len must be >= 2, got {self.max_seq_len!r}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"data.max_samples must be >= 1 or null, got {self.max_samples!r}")


@dataclass
class TrainingSection:
    epochs: float = 1.0
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Optimizer steps to run; overrides epochs."""
    micro_batch_size: int = 4
    """Rows per forward pass (per process)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the loss is normalised by trained tokens across them."""
    lr: float = 2e-4
    """Peak learning rate (AdamW)."""
    lora_plus_ratio: float | None = None
    """LoRA+: B matrices learn this many times faster than A (e.g. 16); None for plain LoRA."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    schedule: Schedule = "cosine"
    """Learning-rate schedule after warmup (linear and cosine decay to zero)."""
    warmup_steps: int = 0
    """Linear warmup steps from 0 to lr."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this; None disables clipping."""
    seed: int = 0
    """Seed for initialisation, shuffling and dropout."""
    bf16: bool | Literal["auto"] = "auto"
    """bf16 autocast; auto: on a GPU that supports it."""
    gradient_checkpointing: bool = False
    """Recompute decoder layers in backward to save activation memory."""
    offload_activations: bool = False
    """With gradient_checkpointing on a GPU: keep the checkpointed layer inputs in pinned CPU memory (frees layers x tokens x hidden of GPU memory; slower). On CPU they are in host memory already."""
    chunked_loss: bool = True
    """Loss from the last hidden states a chunk of rows at a time, never the full fp32 logits (same loss and gradients; models it cannot handle use the full logits)."""
    compile: bool = False
    """torch.compile each decoder layer for the training steps (the first steps compile, slowly; worth it on long GPU runs)."""
    kernels: KernelChoice = "auto"
    """Triton kernels for RMSNorm, SwiGLU, RoPE, the adapters' dropout and the chunked loss's softmax, or the torch code they replace; auto: triton on CUDA when triton is installed and training.compile is off."""
    eval_every: int = 0
    """Evaluate every N optimizer steps (0: only at the start and the end)."""
    save_every: int = 0
    """Checkpoint every N optimizer steps (0: only at the end)."""
    keep_last: int = 2
    """Checkpoints to keep (older ones are deleted)."""
    log_every: int = 1
    """Write a metrics row every N optimizer steps."""
    resume: str | None = None
    """Continue from a checkpoint: "auto" (the newest in the output dir) or a checkpoint path."""
    strategy: Strategy = "single"
    """One process, or several: ddp replicates the model, fsdp (FSDP2) shards the frozen base; both need torchrun or --nproc."""
    objective: ObjectiveName = "sft"
    """What a step minimises: sft (next-token cross-entropy), the preference losses dpo, ipo, simpo, orpo (pairs) and kto (unpaired, labelled), or grpo (rewards of sampled completions)."""
    init_from: str | None = None
    """Start the adapter from a saved one (e.g. an SFT run's directory) with its config and weights, instead of from `lora`; e.g. SFT, then DPO from it."""
    reference_adapter: str | None = None
    """dpo, ipo, kto, grpo: a saved adapter as the frozen reference model (e.g. the SFT run trained from); None: the base model with the adapter switched off."""

    def __post_init__(self) -> None:
        check_choices(self, "training")
        checks = [
            (self.epochs > 0, "training.epochs must be > 0"),
            (self.max_steps is None or self.max_steps >= 1, "training.max_steps must be >= 1 or null"),
            (self.micro_batch_size >= 1, "training.micro_batch_size must be >= 1"),
            (self.grad_accum >= 1, "training.grad_accum must be >= 1"),
            (self.lr > 0, "training.lr must be > 0"),
            (self.lora_plus_ratio is None or self.lora_plus_ratio > 0, "training.lora_plus_ratio must be > 0 or null"),
            (self.warmup_steps >= 0, "training.warmup_steps must be >= 0"),
            (self.max_grad_norm is None or self.max_grad_norm > 0, "training.max_grad_norm must be > 0 or null"),
            (self.eval_every >= 0 and self.save_every >= 0 and self.log_every >= 1,
             "training.eval_every and save_every must be >= 0, log_every >= 1"),
            (self.keep_last >= 1, "training.keep_last must be >= 1"),
            (not (self.kernels == "triton" and self.compile),
             "training.kernels: triton and training.compile: true exclude each other: torch.compile writes its "
             "own Triton kernels for these ops (and lorakit's would break its graphs); keep one, or set "
             "training.kernels: auto"),
            (self.init_from != "" and self.reference_adapter != "",
             "training.init_from and training.reference_adapter take an adapter directory or null, not an empty string"),
            (self.gradient_checkpointing or not self.offload_activations,
             "training.offload_activations moves the checkpointed layer inputs to CPU memory, so it needs "
             "training.gradient_checkpointing: true"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass
class PreferenceSection:
    beta: float | None = None
    """How far the policy may move from the reference (dpo, ipo: the regulariser, kto); SimPO's reward scale. None: 0.1, for simpo 2.0."""
    label_smoothing: float = 0.0
    """dpo, simpo: the assumed share of flipped preference labels (conservative DPO), in [0, 0.5)."""
    gamma: float = 0.5
    """simpo: the target margin between chosen and rejected rewards, as gamma / beta in log-probability (TRL's simpo_gamma)."""
    length_normalize: bool = True
    """simpo: rewards are mean log-probabilities per completion token (the paper's); false: sums."""
    sft_weight: float = 0.0
    """dpo, ipo: add this x the chosen completions' cross-entropy per token (RPO; TRL's loss_type [sigmoid, sft] with loss_weights [1, w]), which keeps the chosen answers likely while the margin grows."""
    orpo_lambda: float = 0.1
    """orpo: weight of the odds-ratio term next to the chosen completions' cross-entropy."""
    desirable_weight: float = 1.0
    """kto: weight of the desirable (label true) examples' loss."""
    undesirable_weight: float = 1.0
    """kto: weight of the undesirable (label false) examples' loss."""
    precompute_reference: bool = False
    """dpo, ipo, kto: compute the reference log-probabilities once before training, not in every step (one no-grad pass over the data; saves a forward per step)."""

    def __post_init__(self) -> None:
        checks = [
            (self.beta is None or self.beta > 0, f"preference.beta must be > 0 or null, got {self.beta!r}"),
            (0 <= self.label_smoothing < 0.5, f"preference.label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}"),
            (self.gamma >= 0, f"preference.gamma must be >= 0, got {self.gamma!r}"),
            (self.orpo_lambda > 0, f"preference.orpo_lambda must be > 0, got {self.orpo_lambda!r}"),
            (self.sft_weight >= 0, f"preference.sft_weight must be >= 0, got {self.sft_weight!r}"),
            (self.desirable_weight > 0 and self.undesirable_weight > 0,
             "preference.desirable_weight and undesirable_weight must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def beta_for(self, objective: str) -> float:
        """`beta`, or the objective's default when unset."""
        return self.beta if self.beta is not None else (2.0 if objective == "simpo" else 0.1)


PREFERENCE_FIELDS_FOR = {
    "label_smoothing": ("dpo", "simpo"), "gamma": ("simpo",), "length_normalize": ("simpo",),
    "orpo_lambda": ("orpo",), "desirable_weight": ("kto",), "undesirable_weight": ("kto",),
    "precompute_reference": ("dpo", "ipo", "kto"), "sft_weight": ("dpo", "ipo"),
    "beta": ("dpo", "ipo", "simpo", "kto"),
}
"""Which objectives read each `preference` setting: setting one for another objective is an error."""


@dataclass
class GrpoSection:
    group_size: int = 4
    """Completions sampled per prompt (G); their rewards are compared within the group."""
    max_completion_len: int = 32
    """New tokens sampled per completion at most."""
    temperature: float = 1.0
    """Sampling temperature; the log-probabilities of the loss use it too."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens holding this probability."""
    epsilon: float = 0.2
    """The policy ratio is clipped to [1 - epsilon, 1 + epsilon_high]."""
    epsilon_high: float | None = None
    """The upper clip (DAPO's clip-higher); None: epsilon."""
    beta: float = 0.04
    """Weight of the KL term to the reference (the base with the adapter off, or training.reference_adapter); 0 skips the reference forward."""
    loss_type: GrpoLoss = "dapo"
    """How token losses are averaged: dapo (over all completion tokens of the step), grpo (per completion, then over completions), dr_grpo (over completions x max_completion_len)."""
    scale_rewards: RewardScale = "group"
    """Advantages are rewards minus the group's mean, divided by the group's std (group) or not (none, as Dr. GRPO recommends)."""
    rewards: list[str] = field(default_factory=list)
    """Reward functions: built-in names (exact_answer, format) or your own as path/to/file.py:fn or package.module:fn; empty: exact_answer, which needs an `answer` field."""
    reward_weights: list[float] | None = None
    """One weight per reward function (the reward is their weighted sum); None: all 1."""

    def __post_init__(self) -> None:
        check_choices(self, "grpo")
        checks = [
            (self.group_size >= 2, f"grpo.group_size must be >= 2 (advantages compare completions of one prompt), "
                                   f"got {self.group_size!r}"),
            (self.max_completion_len >= 1, f"grpo.max_completion_len must be >= 1, got {self.max_completion_len!r}"),
            (self.temperature > 0, f"grpo.temperature must be > 0, got {self.temperature!r}"),
            (0 < self.top_p <= 1, f"grpo.top_p must be in (0, 1], got {self.top_p!r}"),
            (self.epsilon > 0 and (self.epsilon_high is None or self.epsilon_high > 0),
             "grpo.epsilon and epsilon_high must be > 0"),
            (self.beta >= 0, f"grpo.beta must be >= 0, got {self.beta!r}"),
            (self.reward_weights is None or len(self.reward_weights) == max(1, len(self.rewards)),
             f"grpo.reward_weights has {len(self.reward_weights or [])} weights for {max(1, len(self.rewards))} "
             f"reward function(s); give one weight per function"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass
class MixtureSection:
    experts: dict[str, str] = field(default_factory=dict)
    """Expert name -> saved adapter directory; when set, these are mixed instead of training `lora`."""
    kind: KindName = "moe"
    """moe (a gate mixes the experts per token) or fusion (AdapterFusion: attention over their outputs)."""
    train_experts: bool = False
    """moe: train the experts jointly with the gate; false trains the gate alone (fusion: always frozen)."""
    balance_loss: float = 0.01
    """moe: weight of the Switch load-balancing loss added to the training loss."""
    z_loss: float = 0.0
    """moe: weight of the router z-loss added to the training loss."""
    moe: MixtureConfig = field(default_factory=MixtureConfig)
    """The gate of every layer (kind moe)."""
    fusion: FusionConfig = field(default_factory=FusionConfig)
    """The fusion layer of every layer (kind fusion)."""

    def __post_init__(self) -> None:
        check_choices(self, "mixture")
        bad = {k: v for k, v in self.experts.items() if not isinstance(v, str) or not v}
        if bad:
            raise ConfigError(f"mixture.experts maps expert names to adapter directories; {bad} is not a path")
        names = [k for k in self.experts if not isinstance(k, str) or not NAME_RE.fullmatch(k)]
        if names:
            raise ConfigError(f"mixture.experts names {names} are not valid adapter names: use letters, digits, "
                              "'_' and '-'")
        for key in ("balance_loss", "z_loss"):
            if not getattr(self, key) >= 0:
                raise ConfigError(f"mixture.{key} must be >= 0, got {getattr(self, key)!r}")
        moe_only = {"train_experts": False, "balance_loss": 0.01, "z_loss": 0.0}
        tuned = (self.kind != "moe" or any(getattr(self, k) != v for k, v in moe_only.items())
                 or self.moe != MixtureConfig() or self.fusion != FusionConfig())
        if not self.experts and tuned:
            raise ConfigError("mixture settings are given but mixture.experts is empty; name the saved adapters "
                              "to mix, e.g. mixture.experts={a: runs/a, b: runs/b}")
        if self.kind == "moe" and self.fusion != FusionConfig():
            raise ConfigError("mixture.fusion is set but mixture.kind is moe; set mixture.kind=fusion or drop it")
        if self.kind == "fusion":
            set_for_moe = [k for k, default in moe_only.items() if getattr(self, k) != default]
            if set_for_moe or self.moe != MixtureConfig():
                what = ", ".join(f"mixture.{k}" for k in set_for_moe + (["moe"] if self.moe != MixtureConfig() else []))
                raise ConfigError(f"{what}: for kind moe only, but mixture.kind is fusion")
        if self.moe.top_k is not None and self.experts and self.moe.top_k > len(self.experts):
            raise ConfigError(f"mixture.moe.top_k={self.moe.top_k} is more than the {len(self.experts)} experts")


@dataclass
class OutputSection:
    dir: str = "runs/quickstart"
    """The run directory: adapter, checkpoints, metrics, plot, resolved config, model card."""
    tensorboard: bool = True
    """Also log to TensorBoard (when the tensorboard package is installed)."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that get the run's name, config, per-step metrics and final adapter: any of tensorboard, wandb, mlflow (each an extra, e.g. pip install 'lorakit[wandb]'; a missing one is an error)."""
    run_name: str | None = None
    """The run's name in the trackers; None: the name of output.dir."""
    merged_model: bool = False
    """Also write the base with the adapter merged in, as a Hugging Face model directory (merged/)."""

    def __post_init__(self) -> None:
        unknown = [name for name in self.report_to if name not in TRACKERS]
        if unknown:
            raise ConfigError(f"output.report_to: unknown tracker {unknown[0]!r}; valid: {', '.join(TRACKERS)}")
        twice = sorted({name for name in self.report_to if self.report_to.count(name) > 1})
        if twice:
            raise ConfigError(f"output.report_to names {twice[0]} twice; name each tracker once")
        if "tensorboard" in self.report_to and not self.tensorboard:
            raise ConfigError("output.report_to names tensorboard but output.tensorboard is false; drop one of them")
        if self.run_name == "":
            raise ConfigError("output.run_name is empty; give a name, or null for the name of output.dir")


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    """Which base model and how to load it."""
    lora: LoraConfig = field(default_factory=lambda: default_lora())
    """The adapter: every lorakit.LoraConfig (PEFT) field. r, lora_alpha and target_modules depart from PEFT's defaults to where `lorakit plan` suggests a run start (every linear layer, alpha = 2r)."""
    mixture: MixtureSection = field(default_factory=MixtureSection)
    """A mixture of LoRA experts or AdapterFusion over saved adapters, trained instead of `lora`."""
    data: DataSection = field(default_factory=DataSection)
    """Training and evaluation data."""
    training: TrainingSection = field(default_factory=TrainingSection)
    """The optimisation loop."""
    preference: PreferenceSection = field(default_factory=PreferenceSection)
    """Settings of the preference objectives (training.objective dpo, ipo, simpo, orpo, kto)."""
    grpo: GrpoSection = field(default_factory=GrpoSection)
    """Settings of GRPO (training.objective grpo)."""
    output: OutputSection = field(default_factory=OutputSection)
    """What is written where."""

    def __post_init__(self) -> None:
        if self.mixture.experts and self.output.merged_model:
            raise ConfigError("output.merged_model cannot be used with mixture.experts: a mixture picks adapters per "
                              "token, so there is no single merged weight; set output.merged_model=false")
        if self.model.quantize_base != "none" and self.training.strategy != "single":
            raise ConfigError(f"model.quantize_base={self.model.quantize_base} trains with training.strategy=single "
                              f"only (4-bit layers are not sharded or replicated by {self.training.strategy}); "
                              "set training.strategy=single or model.quantize_base=none")
        self._check_objective()
        if self.training.init_from and (changed := _changed_fields(self.lora, default_lora())):
            raise ConfigError(f"training.init_from continues the adapter in {self.training.init_from} with its own "
                              f"configuration, so the lora section's {', '.join(f'lora.{k}' for k in changed)} would "
                              "be ignored; drop them, or drop training.init_from to train a new adapter")

    def check_adapter_paths(self) -> None:
        """training.init_from and training.reference_adapter name saved adapters: a missing one is
        an error naming the key, before the model is loaded."""
        for key in ("init_from", "reference_adapter"):
            where = getattr(self.training, key)
            if where and not (Path(where) / "adapter_config.json").is_file():
                raise ConfigError(f"training.{key}: {where} is not a saved adapter (no adapter_config.json there); "
                                  "give the directory of a lorakit or PEFT adapter, e.g. an earlier run's output.dir")

    def _check_objective(self) -> None:
        """Settings of one objective given for another, and what the non-SFT objectives do not combine with."""
        objective, pref = self.training.objective, self.preference
        for name, readers in PREFERENCE_FIELDS_FOR.items():
            if getattr(pref, name) != getattr(PreferenceSection(), name) and objective not in readers:
                raise ConfigError(f"preference.{name} is set but training.objective is {objective}; it applies to "
                                  f"{', '.join(readers)} only. Drop it or set training.objective")
        if self.grpo != GrpoSection() and objective != "grpo":
            raise ConfigError(f"grpo settings are given but training.objective is {objective}; set "
                              "training.objective=grpo or drop the grpo section")
        if self.training.reference_adapter and objective not in REFERENCE_OBJECTIVES:
            raise ConfigError(f"training.reference_adapter is set but training.objective is {objective}, which "
                              f"compares no reference model; it applies to {', '.join(REFERENCE_OBJECTIVES)}")
        if objective == "sft":
            return
        if self.mixture.experts:
            raise ConfigError(f"training.objective={objective} trains a LoRA adapter; mixture.experts trains with "
                              "training.objective=sft only")
        if objective == "grpo" and self.training.strategy == "fsdp":
            raise ConfigError("training.objective=grpo samples with generate, whose decoding steps differ between "
                              "processes, and FSDP2 gathers weights in every step of all of them; use "
                              "training.strategy=ddp (or single)")
        if self.data.packing:
            raise ConfigError(f"data.packing is for training.objective=sft; {objective} compares whole completions "
                              "one per row. Set data.packing=false")
        if self.data.train_on_inputs:
            raise ConfigError(f"data.train_on_inputs is for training.objective=sft; {objective} scores completions "
                              "only. Set data.train_on_inputs=false")


def default_lora() -> LoraConfig:
    return LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")


def _changed_fields(value: LoraConfig, default: LoraConfig) -> list[str]:
    """The fields of `value` that differ from `default`'s."""
    return [f.name for f in fields(value) if getattr(value, f.name) != getattr(default, f.name)]


OTHER_TOOLS_NAMES: dict[str, str] = {
    "rank": "lora.r",
    "lora_r": "lora.r",
    "lora_rank": "lora.r",
    "alpha": "lora.lora_alpha",
    "dropout": "lora.lora_dropout",
    "lora_target_modules": "lora.target_modules",
    "lora_target": "lora.target_modules",
    "lora_fan_in_fan_out": "lora.fan_in_fan_out",
    "lora_modules_to_save": "lora.modules_to_save",
    "peft_use_dora": "lora.use_dora",
    "peft_use_rslora": "lora.use_rslora",
    "base_model": "model.name_or_path",
    "model_name_or_path": "model.name_or_path",
    "torch_dtype": "model.dtype",
    "load_in_4bit": "model.quantize_base",
    "datasets": "data.train",
    "dataset": "data.train",
    "test_datasets": "data.eval",
    "eval_dataset": "data.eval",
    "val_set_size": "data.eval_fraction",
    "val_size": "data.eval_fraction",
    "max_seq_length": "data.max_seq_len",
    "max_length": "data.max_seq_len",
    "sequence_len": "data.max_seq_len",
    "cutoff_len": "data.max_seq_len",
    "sample_packing": "data.packing",
    "max_train_samples": "data.max_samples",
    "learning_rate": "training.lr",
    "num_epochs": "training.epochs",
    "num_train_epochs": "training.epochs",
    "per_device_train_batch_size": "training.micro_batch_size",
    "batch_size": "training.micro_batch_size",
    "gradient_accumulation_steps": "training.grad_accum",
    "lr_scheduler": "training.schedule",
    "lr_scheduler_type": "training.schedule",
    "loraplus_lr_ratio": "training.lora_plus_ratio",
    "save_steps": "training.save_every",
    "save_total_limit": "training.keep_last",
    "eval_steps": "training.eval_every",
    "logging_steps": "training.log_every",
    "resume_from_checkpoint": "training.resume",
    "output_dir": "output.dir",
}
"""The names PEFT, Hugging Face's TrainingArguments, TRL, axolotl and LLaMA-Factory give to what a
lorakit key is, and that key: an unknown key of one of these names, in any section or at the top
(as axolotl writes them), is answered with the lorakit key. Names that are lorakit's in another
section (`seed`, `lora_dropout`, `micro_batch_size`) need no entry: the hint finds where they live."""


def load_config(path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (None: all defaults), apply `key.sub=value` overrides, validate. An error
    names the file or the override it comes from."""
    return from_file_and_overrides(TrainConfig, path, overrides or [], OTHER_TOOLS_NAMES)
