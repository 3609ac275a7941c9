"""`LoraConfig`: PEFT's LoRA fields and defaults, validated once on construction.

The field names, defaults and JSON form are PEFT's, so an `adapter_config.json` written by one
tool is read by the other. Per-module rank and alpha come from `rank_pattern` / `alpha_pattern`,
whose keys are regexes matched against a dot-bounded suffix of the module name; the first key
that matches wins (PEFT's rule).

A config may come from an untrusted file, and a regex with nested quantifiers (`(.+)+x`)
backtracks in Python's `re` for longer than the universe has existed on a 30-character module
name. So every regex a config holds is compiled and matched by the `regex` package (the same
syntax as `re` for PEFT's patterns), whose matches take a time limit: past `REGEX_TIMEOUT_S` the
match is a `ConfigError` naming the field, never a hang. A static check for "dangerous" patterns
would miss the other shapes that backtrack (overlapping alternatives, `(.|[a-z])+`); a time
limit misses none.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import regex

from .errors import ConfigError

BIAS_MODES = ("none", "all", "lora_only")
PISSA_NITER = re.compile(r"pissa_niter_(\d+)")
"""`init_lora_weights="pissa_niter_N"`: PiSSA by a randomized SVD with N subspace iterations."""

# PEFT's `adapter_config.json` keys that lorakit does not model. Harmless when they hold their
# "off" value (None, False, {}, [] or the listed default); anything else changes the math.
_PEFT_OFF_KEYS: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "corda_config": None,
    "eva_config": None,
    "kasa_config": None,
    "layer_replication": None,
    "loftq_config": {},
    "lora_ga_config": None,
    "megatron_config": None,
    "monteclora_config": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_qalora": False,
    "velora_config": None,
}
# PEFT keys that are bookkeeping only.
_PEFT_IGNORED_KEYS = {
    "auto_mapping",
    "peft_version",
    "megatron_core",
    "qalora_group_size",
    "ensure_weight_tying",
    "lora_mode",
}

NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")
"""An adapter name: it names a folder when saved."""

# Defaults for `target_modules=None`, by `model.config.model_type` (PEFT's choices).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    **{t: ["q_proj", "v_proj"] for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma",
                                          "gemma2", "gemma3_text", "opt", "phi3", "olmo", "olmo2")},
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
}


def scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """The factor in front of B A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


REGEX_TIMEOUT_S = 1.0
"""Time limit of one config regex against one module name. PEFT's patterns take microseconds, so
only catastrophic backtracking comes near it."""


def match_name(what: str, pattern: str, module_name: str, full: str | None = None) -> regex.Match | None:
    """The config regex `pattern` (field `what`) fullmatched against `module_name`, or `full`, a
    regex built around it, in its place; past `REGEX_TIMEOUT_S`, a `ConfigError` naming the field."""
    try:
        return regex.fullmatch(pattern if full is None else full, module_name, timeout=REGEX_TIMEOUT_S)
    except TimeoutError:
        raise ConfigError(
            f"{what} {pattern!r} took over {REGEX_TIMEOUT_S:g} s to match the module name {module_name!r}: it "
            "backtracks catastrophically (a quantifier inside a quantifier, such as (.+)+, or overlapping "
            "alternatives under one, such as (.|\\w)+). Rewrite it without them, e.g. '.*\\.(q_proj|v_proj)', "
            "or give a list of module names"
        ) from None


def pattern_key(keys: list[str], module_name: str, what: str = "LoraConfig.rank_pattern key") -> str | None:
    """The first `rank_pattern` / `alpha_pattern` key (field `what`, for errors) whose regex matches
    a dot-bounded suffix of `module_name`."""
    for key in keys:
        if match_name(what, key, module_name, full=rf"(.*\.)?({key})"):
            return key
    return None


@dataclass
class LoraConfig:
    """One adapter's configuration, with PEFT's field names and defaults."""

    r: int = 8
    """Rank of the update B A."""
    lora_alpha: float = 8
    """Numerator of the scaling: alpha / r (alpha / sqrt(r) with `use_rslora`)."""
    lora_dropout: float = 0.0
    """Dropout probability on the adapter path's input (the base path never sees dropout)."""
    target_modules: str | list[str] | None = None
    """A regex fullmatched against module names, a list of names or name suffixes, or
    "all-linear". None uses the model type's default (e.g. q_proj, v_proj for Llama)."""
    exclude_modules: str | list[str] | None = None
    """Modules never to adapt, by the same rules as `target_modules`."""
    target_parameters: list[str] | None = None
    """Parameters to adapt directly (PEFT's `target_parameters`), e.g. the fused expert weights of a
    mixture-of-experts model: "mlp.experts.gate_up_proj" matches a parameter whose full name is
    that or ends with "." + it. "all-linear" adds every fused expert weight of the model itself.
    With `target_modules` None, only these parameters are adapted (PEFT's rule)."""
    bias: str = "none"
    """Which base biases train: "none", "all", or "lora_only" (those of adapted layers)."""
    fan_in_fan_out: bool = False
    """The base stores its weight as (in, out), as GPT-2's Conv1D does; set for Conv1D automatically."""
    modules_to_save: list[str] | None = None
    """Modules trained in full as a copy next to the adapter (e.g. ["lm_head"])."""
    init_lora_weights: bool | str = True
    """True (kaiming A, zero B), "gaussian", "pissa", "pissa_niter_N", "olora", or False (random B)."""
    layers_to_transform: int | list[int] | None = None
    """Only adapt these layer indices (list `target_modules` only)."""
    layers_pattern: str | list[str] | None = None
    """Name of the layer container holding the index (e.g. "layers"); default: the first index."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank: regex on a dot-bounded suffix of the module name -> r."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha: regex on a dot-bounded suffix of the module name -> alpha."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    use_dora: bool = False
    """Weight-decomposed LoRA: a trainable magnitude per output row (Linear and Conv1D)."""
    lora_bias: bool = False
    """Give B a trainable bias (needs a base layer with a bias)."""
    task_type: str | None = None
    """PEFT task type, written to adapter_config.json (e.g. "CAUSAL_LM")."""
    base_model_name_or_path: str | None = None
    """Base model id or path, written to adapter_config.json (filled from the model if None)."""
    revision: str | None = None
    """Base model revision, written to adapter_config.json."""
    inference_mode: bool = False
    """Written to adapter_config.json; True for adapters saved for inference."""

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.layers_to_transform, tuple):
            self.layers_to_transform = list(self.layers_to_transform)
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        self._validate()

    def _validate(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"LoraConfig.r must be an integer >= 1, got {self.r!r}")
        _check_alpha("LoraConfig.lora_alpha", self.lora_alpha)
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"LoraConfig.bias must be one of {', '.join(map(repr, BIAS_MODES))}, got {self.bias!r}")
        init = self.init_lora_weights
        if not (isinstance(init, bool) or init in ("gaussian", "pissa", "olora")
                or (isinstance(init, str) and PISSA_NITER.fullmatch(init))):
            raise ConfigError(
                "LoraConfig.init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_N' "
                f"(N an integer) or 'olora', got {init!r}"
            )
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                _compile(f"LoraConfig.{name}", value)
            elif value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise ConfigError(f"LoraConfig.{name} must be a regex string or a list of module names, got {value!r}")
        if isinstance(self.target_parameters, (set, tuple)):
            self.target_parameters = list(self.target_parameters)
        if self.target_parameters is not None and not (
            isinstance(self.target_parameters, list) and all(isinstance(v, str) and v for v in self.target_parameters)
        ):
            raise ConfigError("LoraConfig.target_parameters must be a list of parameter names (e.g. "
                              f"['mlp.experts.gate_up_proj']), got {self.target_parameters!r}")
        if self.modules_to_save is not None and not (
            isinstance(self.modules_to_save, list) and all(isinstance(v, str) and v for v in self.modules_to_save)
        ):
            raise ConfigError(f"LoraConfig.modules_to_save must be a list of module names, got {self.modules_to_save!r}")
        for key, value in self.rank_pattern.items():
            _compile("LoraConfig.rank_pattern key", key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"LoraConfig.rank_pattern[{key!r}] must be an integer >= 1, got {value!r}")
        for key, value in self.alpha_pattern.items():
            _compile("LoraConfig.alpha_pattern key", key)
            _check_alpha(f"LoraConfig.alpha_pattern[{key!r}]", value)
        layers = self.layers_to_transform
        if layers is not None:
            items = [layers] if isinstance(layers, int) else layers
            if not isinstance(items, list) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in items):
                raise ConfigError(f"LoraConfig.layers_to_transform must be a layer index or a list of them, got {layers!r}")
            if isinstance(self.target_modules, str):
                raise ConfigError(
                    "LoraConfig.layers_to_transform needs target_modules as a list of names; with a regex "
                    "string, put the layer indices into the regex instead"
                )
        if self.layers_pattern not in (None, "", []) and layers is None:
            raise ConfigError("LoraConfig.layers_pattern is only used with layers_to_transform; set both or neither")
        for pattern in [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern or []:
            _compile("LoraConfig.layers_pattern", pattern)

    # ---- per-module values -------------------------------------------------------------------

    def rank_for(self, module_name: str) -> int:
        key = pattern_key(list(self.rank_pattern), module_name, "LoraConfig.rank_pattern key")
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        key = pattern_key(list(self.alpha_pattern), module_name, "LoraConfig.alpha_pattern key")
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scaling_for(self, module_name: str) -> float:
        return scaling(self.rank_for(module_name), self.alpha_for(module_name), self.use_rslora)

    # ---- PEFT JSON ---------------------------------------------------------------------------

    def to_peft_dict(self) -> dict[str, Any]:
        """The `adapter_config.json` content: the keys every PEFT version reads, and
        `target_parameters` (PEFT 0.17 and later) only when there are any. PEFT refuses
        `lora_dropout` > 0 next to `target_parameters`; dropout acts in training only, so an
        adapter with adapted parameters is written with 0, which PEFT, vLLM and lorakit load."""
        d = asdict(self)
        if not self.target_parameters:
            del d["target_parameters"]
        else:
            d["lora_dropout"] = 0.0
        d["peft_type"] = "LORA"
        return dict(sorted(d.items()))

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], source: str = "adapter_config.json") -> LoraConfig:
        """Build a config from PEFT's JSON. Unknown keys warn; PEFT features lorakit does not
        implement are an error when switched on (loading them would silently change the math)."""
        if data.get("peft_type") != "LORA":
            raise ConfigError(f"{source}: peft_type is {data.get('peft_type')!r}; lorakit loads LoRA adapters (peft_type 'LORA')")
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        unknown: list[str] = []
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in _PEFT_OFF_KEYS:
                if value not in (None, False, {}, [], _PEFT_OFF_KEYS[key]):
                    raise ConfigError(
                        f"{source}: {key}={value!r} is a PEFT feature lorakit does not implement; "
                        "the adapter without it would compute something else"
                    )
            elif key not in _PEFT_IGNORED_KEYS and key != "peft_type":
                unknown.append(key)
        if unknown:
            warnings.warn(f"{source}: ignoring unknown keys {', '.join(sorted(unknown))}", stacklevel=3)
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


def _compile(what: str, pattern: str) -> None:
    if not isinstance(pattern, str):
        raise ConfigError(f"{what} must be a regex string, got {pattern!r}")
    try:
        regex.compile(pattern)
    except regex.error as e:
        raise ConfigError(f"{what} {pattern!r} is not a valid regex: {e}") from None


def _check_alpha(what: str, value: Any) -> None:
    """An alpha is a number > 0 and finite: Python's json reads `Infinity`, and an infinite scaling
    makes every output non-finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{what} must be a number > 0, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{what} must be finite, got {value!r}: the scaling alpha / r would make every "
                          "output non-finite")
