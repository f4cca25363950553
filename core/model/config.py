"""ModelConfig: the ERNIE-4.5 hyper-parameters read from a checkpoint's config.json.

Accepts every variant in docs/model.md section 9 (rope_theta top level or in rope_parameters,
dtype or torch_dtype, both dense architecture names, head_dim present or absent) and
validates with errors that name the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

DENSE_ARCHITECTURES = ("Ernie4_5ForCausalLM", "Ernie4_5_ForCausalLM")
MOE_ARCHITECTURES = ("Ernie4_5_MoeForCausalLM", "Ernie4_5_MoEForCausalLM")
DTYPE_NAMES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
               "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32"}


class ConfigError(ValueError):
    """config.json is missing a field, has a wrong type, or describes an unsupported model."""


# Upper bounds far above every released model (300B: 54 layers, hidden 8192, 103424 tokens),
# low enough that a typo or a hostile file fails at once instead of allocating for minutes.
MAX_VALUE = {"vocab_size": 2**22, "hidden_size": 2**16, "intermediate_size": 2**18, "num_hidden_layers": 1024,
             "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 1024,
             "max_position_embeddings": 2**24, "moe_num_experts": 4096, "moe_k": 4096,
             "moe_intermediate_size": 2**18, "moe_num_shared_experts": 64, "moe_layer_interval": 1024}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 131072
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    dtype: str = "bfloat16"
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    # MoE fields; moe_num_experts == 0 means a dense model.
    moe_num_experts: int = 0
    moe_k: int = 0
    moe_intermediate_size: int = 0
    moe_num_shared_experts: int = 0
    moe_layer_start_index: int = 0
    moe_layer_end_index: int = -1
    moe_layer_interval: int = 1
    moe_norm_min: float = 1e-12
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    # ---- derived -------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.moe_num_experts > 0

    @property
    def model_type(self) -> str:
        return "ernie4_5_moe" if self.is_moe else "ernie4_5"

    @property
    def architecture(self) -> str:
        return MOE_ARCHITECTURES[0] if self.is_moe else DENSE_ARCHITECTURES[0]

    @property
    def moe_end(self) -> int:
        """HF maps -1 (or absent) to the last layer."""
        return self.num_hidden_layers - 1 if self.moe_layer_end_index < 0 else self.moe_layer_end_index

    def is_moe_layer(self, i: int) -> bool:
        """docs/model.md section 1: (i+1) % interval == 0 and start <= i <= end."""
        if not self.is_moe:
            return False
        return (i + 1) % self.moe_layer_interval == 0 and self.moe_layer_start_index <= i <= self.moe_end

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_num_shared_experts * self.moe_intermediate_size

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- reading -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "ModelConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, found {type(raw).__name__}")
        archs = raw.get("architectures") or []
        model_type = raw.get("model_type")
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ConfigError(f"{source}: field 'architectures' must be a list of names, found {archs!r}")
        known = DENSE_ARCHITECTURES + MOE_ARCHITECTURES
        if archs and not any(a in known for a in archs):
            raise ConfigError(
                f"{source}: architectures {archs} is not an ERNIE-4.5 text model; "
                f"expected one of {list(known)}")
        if model_type is not None and model_type not in ("ernie4_5", "ernie4_5_moe"):
            raise ConfigError(f"{source}: model_type {model_type!r} is not 'ernie4_5' or 'ernie4_5_moe'")
        experts = raw.get("moe_num_experts", raw.get("num_experts"))
        is_moe = any(a in MOE_ARCHITECTURES for a in archs) or model_type == "ernie4_5_moe" or \
            (experts is not None and _typed(experts, int, "moe_num_experts", source) > 0)

        def need(name, kind=int, alt=None):
            value = raw.get(name, raw.get(alt) if alt else None)
            if value is None:
                raise ConfigError(f"{source}: required field {name!r} is missing")
            return _typed(value, kind, name, source)

        def opt(name, default, kind=int, alt=None):
            value = raw.get(name, raw.get(alt) if alt else None)
            return default if value is None else _typed(value, kind, name, source)

        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{source}: field 'rope_parameters' must be an object, found {rope!r}")
        theta = raw.get("rope_theta", rope.get("rope_theta") if isinstance(rope, dict) else None)
        rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
        if rope_type not in (None, "default"):
            raise ConfigError(f"{source}: rope type {rope_type!r} is not supported; ERNIE-4.5 uses default RoPE")
        dtype_raw = raw.get("dtype", raw.get("torch_dtype", "bfloat16"))
        if str(dtype_raw) not in DTYPE_NAMES:
            raise ConfigError(f"{source}: field 'dtype' is {dtype_raw!r}; expected bfloat16, float16 or float32")
        eos = raw.get("eos_token_id", 2)
        if isinstance(eos, list):
            eos = eos[0] if eos else 2
        eos = 2 if eos is None else eos
        extra = {k: v for k, v in raw.items() if k not in _KNOWN_FIELDS}
        kwargs = dict(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=opt("num_key_value_heads", heads),
            head_dim=opt("head_dim", hidden // heads if heads else 0),
            max_position_embeddings=opt("max_position_embeddings", 131072),
            rope_theta=_typed(500000.0 if theta is None else theta, float, "rope_theta", source),
            rms_norm_eps=opt("rms_norm_eps", 1e-5, float),
            tie_word_embeddings=opt("tie_word_embeddings", True, bool),
            dtype=DTYPE_NAMES[str(dtype_raw)],
            bos_token_id=opt("bos_token_id", 1),
            eos_token_id=_typed(eos, int, "eos_token_id", source),
            pad_token_id=opt("pad_token_id", 0),
            extra=extra,
        )
        if raw.get("use_bias"):
            raise ConfigError(f"{source}: use_bias=true is not an ERNIE-4.5 -PT checkpoint (no biases anywhere)")
        if is_moe:
            gate_act = raw.get("moe_gate_act", "softmax")
            if gate_act != "softmax":
                raise ConfigError(f"{source}: moe_gate_act {gate_act!r} is not supported; released checkpoints use softmax")
            kwargs.update(
                moe_num_experts=need("moe_num_experts", alt="num_experts"),
                moe_k=need("moe_k", alt="num_experts_per_tok"),
                moe_intermediate_size=need("moe_intermediate_size"),
                moe_num_shared_experts=opt("moe_num_shared_experts", 0),
                moe_layer_start_index=opt("moe_layer_start_index", 0),
                moe_layer_end_index=opt("moe_layer_end_index", -1),
                moe_layer_interval=opt("moe_layer_interval", 1),
                moe_norm_min=opt("moe_norm_min", 1e-12, float),
            )
        cfg = cls(**kwargs)
        cfg.validate(source)
        return cfg

    @classmethod
    def from_file(cls, path: str) -> "ModelConfig":
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise ConfigError(f"{path}: not found; a checkpoint directory needs a config.json")
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        except RecursionError:
            raise ConfigError(f"{path}: not a config: JSON nested too deeply") from None
        return cls.from_dict(raw, source=path)

    def validate(self, source: str = "config") -> None:
        def check(ok, msg):
            if not ok:
                raise ConfigError(f"{source}: {msg}")
        for f in dataclasses.fields(self):      # types first: a replace() or a constructor may pass anything
            value, kind = getattr(self, f.name), {"int": int, "float": float, "bool": bool}.get(f.type)
            if kind is not None:
                _typed(value, kind, f.name, source)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            check(getattr(self, name) > 0, f"field {name!r} must be positive, found {getattr(self, name)}")
        for name, most in MAX_VALUE.items():
            check(getattr(self, name) <= most, f"field {name!r} is {getattr(self, name)}, above the sane limit of "
                                               f"{most}; the file is damaged or not an ERNIE-4.5 config")
        check(self.rope_theta <= 1e12, f"field 'rope_theta' is {self.rope_theta}, above the sane limit of 1e12")
        check(self.rms_norm_eps < 1, f"field 'rms_norm_eps' must be below 1, found {self.rms_norm_eps}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            check(-1 <= value < self.vocab_size, f"field {name!r} is {value}, expected a token id below "
                                                 f"vocab_size ({self.vocab_size})")
        check(self.num_attention_heads % self.num_key_value_heads == 0,
              f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
              f"num_key_value_heads ({self.num_key_value_heads})")
        check(self.head_dim % 2 == 0, f"field 'head_dim' must be even for rotary embedding, found {self.head_dim}")
        check(self.rope_theta > 0, f"field 'rope_theta' must be positive, found {self.rope_theta}")
        check(self.rms_norm_eps > 0, f"field 'rms_norm_eps' must be positive, found {self.rms_norm_eps}")
        if self.is_moe:
            check(1 <= self.moe_k <= self.moe_num_experts,
                  f"moe_k ({self.moe_k}) must be between 1 and moe_num_experts ({self.moe_num_experts})")
            check(self.moe_intermediate_size > 0, "field 'moe_intermediate_size' must be positive")
            check(self.moe_layer_interval >= 1, "field 'moe_layer_interval' must be >= 1")
            check(self.moe_num_shared_experts >= 0, "field 'moe_num_shared_experts' must be >= 0")
            check(0 <= self.moe_layer_start_index < self.num_hidden_layers,
                  f"moe_layer_start_index ({self.moe_layer_start_index}) must be a layer index below "
                  f"num_hidden_layers ({self.num_hidden_layers})")
            check(-1 <= self.moe_layer_end_index < self.num_hidden_layers,
                  f"moe_layer_end_index ({self.moe_layer_end_index}) must be -1 (the last layer) or a layer "
                  f"index below num_hidden_layers ({self.num_hidden_layers})")
            check(0 < self.moe_norm_min < 1, f"field 'moe_norm_min' must be in (0, 1), found {self.moe_norm_min}")

    # ---- writing -------------------------------------------------------------------------
    def to_hf_dict(self) -> dict:
        """The -PT config.json a Hugging Face checkpoint of this model carries."""
        out = dict(self.extra)
        out.update(
            architectures=[self.architecture], model_type=self.model_type,
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim, max_position_embeddings=self.max_position_embeddings,
            rope_theta=self.rope_theta, rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings, torch_dtype=self.dtype,
            bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id, hidden_act="silu", use_bias=False, use_cache=False,
        )
        if self.is_moe:
            out.update(
                moe_num_experts=self.moe_num_experts, moe_k=self.moe_k,
                moe_intermediate_size=self.moe_intermediate_size,
                moe_num_shared_experts=self.moe_num_shared_experts,
                moe_layer_start_index=self.moe_layer_start_index,
                moe_layer_end_index=self.moe_end, moe_layer_interval=self.moe_layer_interval,
                moe_norm_min=self.moe_norm_min, moe_use_aux_free=True, moe_gate="topk",
                moe_capacity=[self.moe_num_experts] * 3, use_rmsnorm=True,
            )
        return out


_KNOWN_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)} | {
    "architectures", "model_type", "rope_parameters", "rope_scaling", "torch_dtype", "num_experts",
    "num_experts_per_tok", "use_bias", "moe_gate_act"}


def _typed(value, kind, name, source):
    """`value` as `kind`; a ConfigError naming file and field for anything else (strings, lists,
    booleans where numbers belong, NaN and Infinity, which Python's json accepts)."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: field {name!r} must be true or false, found {_short(value)}")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value):
        what = "an integer" if kind is int else "a finite number"
        raise ConfigError(f"{source}: field {name!r} must be {what}, found {_short(value)}")
    if kind is int:
        if int(value) != value:
            raise ConfigError(f"{source}: field {name!r} must be an integer, found {value!r}")
        return int(value)
    return float(value)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# The three released models (docs/model.md section 1) and two tiny ones for tests and the default.
PRESETS: dict[str, ModelConfig] = {
    "ernie-4.5-0.3b": ModelConfig(
        vocab_size=103424, hidden_size=1024, intermediate_size=3072, num_hidden_layers=18,
        num_attention_heads=16, num_key_value_heads=2, head_dim=128, tie_word_embeddings=True),
    "ernie-4.5-21b-a3b": ModelConfig(
        vocab_size=103424, hidden_size=2560, intermediate_size=12288, num_hidden_layers=28,
        num_attention_heads=20, num_key_value_heads=4, head_dim=128, tie_word_embeddings=True,
        moe_num_experts=64, moe_k=6, moe_intermediate_size=1536, moe_num_shared_experts=2,
        moe_layer_start_index=1, moe_layer_end_index=27),
    "ernie-4.5-300b-a47b": ModelConfig(
        vocab_size=103424, hidden_size=8192, intermediate_size=28672, num_hidden_layers=54,
        num_attention_heads=64, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
        moe_num_experts=64, moe_k=8, moe_intermediate_size=3584, moe_num_shared_experts=0,
        moe_layer_start_index=3, moe_layer_end_index=53),
    # head_dim 32 != hidden/heads (16) on purpose: the 0.3B trap, in miniature.
    "tiny": ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048),
    "tiny-moe": ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
        moe_num_experts=8, moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=2,
        moe_layer_start_index=1, moe_layer_end_index=2),
}


def preset(name: str, layers: int | None = None) -> ModelConfig:
    key = name.lower()
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[key]
    if layers is not None:
        if layers < 1:
            raise ConfigError(f"--layers must be >= 1, found {layers}")
        end = cfg.moe_end if cfg.is_moe else -1
        cfg = cfg.replace(num_hidden_layers=layers,
                          moe_layer_end_index=min(end, layers - 1) if cfg.is_moe else -1)
        if cfg.is_moe and cfg.moe_layer_start_index >= layers:
            cfg = cfg.replace(moe_layer_start_index=layers - 1)
        cfg.validate(f"preset {name!r} with --layers {layers}")
    return cfg
