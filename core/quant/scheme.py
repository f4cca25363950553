"""Which weight-only scheme a load uses, checked once: wint8 / wint4 and the group size.

Scheme (the issue's, so every result can be checked against an oracle): per output row and per
group of `group_size` consecutive input columns (-1: the whole row), s = max|w| / qmax with qmax
127 (wint8) or 7 (wint4), q = clamp(round_half_to_even(w / s), -qmax, qmax), q = 0 where s = 0.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

QMAX = {"wint8": 127, "wint4": 7}
BITS = {"wint8": 8, "wint4": 4}
DEFAULT_GROUP = {"wint8": -1, "wint4": 128}
NONE = ("none", "", None, "off", "fp", "bf16")
# What is quantized: every 2-D projection and the embedding table; norms, the fp32 router and its
# correction bias are not (graph roles, core/model/graph.py).
QUANTIZED_ROLES = frozenset({"embed", "attn", "mlp", "expert", "shared_expert", "head"})


class QuantError(ValueError):
    """A quantization request that cannot be met (scheme, group size, a tensor's shape)."""


@dataclass(frozen=True)
class QuantSpec:
    scheme: str          # "wint8" | "wint4"
    group_size: int      # -1: per output channel; else a power of two >= 32 dividing `in`
    # a kernel choice, not a storage one: decode multiplies int8-quantized activations (blocks of
    # 32, kernels/reference/int8_activations.py) where the backend has the kernels
    int8_activations: bool = False

    @property
    def bits(self) -> int:
        return BITS[self.scheme]

    @property
    def qmax(self) -> int:
        return QMAX[self.scheme]

    @property
    def label(self) -> str:
        g = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"{self.scheme} {g}" + (", int8 activations" if self.int8_activations else "")

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size

    def check(self, name: str, shape) -> None:
        """One line naming the tensor and sizes when this scheme cannot pack it."""
        cols = shape[-1]
        if self.group_size != -1 and cols % self.group_size:
            raise QuantError(f"{name}: input dimension {cols} (shape {list(shape)}) is not divisible by "
                             f"group size {self.group_size}; pick a group size that divides it or -1 (per channel)")
        if self.bits == 4 and cols % 2:
            raise QuantError(f"{name}: wint4 packs two values per byte, input dimension {cols} "
                             f"(shape {list(shape)}) is odd; use wint8")

    def packed_nbytes(self, shape) -> int:
        """Bytes of the packed integers plus the fp32 scales of a weight of `shape`."""
        rows = 1
        for s in shape[:-1]:
            rows *= s
        cols = shape[-1]
        return rows * (cols * self.bits // 8 + 4 * self.groups(cols))

    def as_config(self) -> dict:
        """The `quantization_config` a quantized checkpoint's config.json carries."""
        return {"quant_method": "ernie-hal", "scheme": self.scheme, "bits": self.bits,
                "group_size": self.group_size, "symmetric": True, "scale_dtype": "float32",
                "packing": "int8 [out, in]" if self.bits == 8 else
                           "uint8 [out, in/2], q + 8, low nibble = even column",
                "modules_not_quantized": ["norms", "mlp.gate (router)", "e_score_correction_bias"]}


def is_quantized_role(role: str) -> bool:
    return role in QUANTIZED_ROLES


def resolve(quantization: str | None, group_size: int | None = None) -> QuantSpec | None:
    """QuantSpec for a user's request, or None for no quantization; QuantError on bad input."""
    q = quantization.lower() if isinstance(quantization, str) else quantization
    if q in NONE:
        if group_size not in (None,):
            raise QuantError(f"--group-size {group_size} needs --quantization wint8 or wint4")
        return None
    if q not in QMAX:
        raise QuantError(f"quantization {quantization!r} is not a scheme; choose none, wint8 or wint4")
    g = DEFAULT_GROUP[q] if group_size is None else group_size
    if not isinstance(g, int) or isinstance(g, bool) or not (g == -1 or (g >= 32 and g & (g - 1) == 0)):
        raise QuantError(f"group size {group_size!r} is not valid; use -1 (per channel) or a power of two "
                         f"from 32 up (32, 64, 128, ...)")
    return QuantSpec(q, g)


def with_int8_activations(quant: QuantSpec | None, enabled: bool) -> QuantSpec | None:
    """`quant` with int8 activations turned on when asked; QuantError without quantized weights."""
    if not enabled:
        return quant
    if quant is None:
        raise QuantError("int8 activations (--int8-activations) apply to quantized weights only; add "
                         "--quantization wint8 or wint4, or load a checkpoint from `ernie-hal quantize`")
    return replace(quant, int8_activations=True)


def from_config(qc: dict, where: str) -> QuantSpec:
    """The QuantSpec a quantized checkpoint's config.json declares."""
    try:
        if qc.get("quant_method") != "ernie-hal":
            raise QuantError(f"{where}: quantization_config.quant_method is {qc.get('quant_method')!r}; "
                             f"ernie-hal reads only its own quantized checkpoints (quant_method 'ernie-hal')")
        return resolve(qc["scheme"], int(qc["group_size"]))
    except (KeyError, TypeError, AttributeError):
        raise QuantError(f"{where}: quantization_config must carry scheme and group_size, found {qc!r}") from None
