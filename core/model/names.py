"""The -PT checkpoint's tensor names, shapes and dtypes for a ModelConfig (docs/model.md section 3).

One table shared by the reader (validation) and the random-weight writer, so the two cannot
drift apart. Linear weights are [out, in]; the router and its correction bias are fp32.
"""

from __future__ import annotations

import torch

from .config import ModelConfig

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
FINAL_NORM = "model.norm.weight"


def expected_tensors(config: ModelConfig, include_lm_head: bool | None = None,
                     dtype: torch.dtype | str | None = None) -> dict[str, tuple[tuple, torch.dtype]]:
    """{name: (shape, dtype)} in model order, from the graph (the one place names are made).
    `include_lm_head` None means "untied per config"; `dtype` overrides config.dtype for
    everything except the fp32 router and bias."""
    from .graph import build
    graph = build(config, untied_head=include_lm_head, dtype=_torch_dtype(dtype or config.dtype))
    return graph.expected_tensors()


def is_ignored(name: str) -> bool:
    """Tensors the plain forward never uses: the MTP head (docs/model.md 3.4)."""
    return "mtp" in name


def is_paddle_name(name: str) -> bool:
    """Names only the -Paddle checkpoints use (docs/model.md 3.4): `ernie.` prefix, fused projections."""
    return name.startswith("ernie.") or "qkv_proj" in name or "up_gate_proj" in name


def _torch_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; expected bfloat16, float16 or float32")
    return value
