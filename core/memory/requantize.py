"""The one plan quantize-at-load cannot serve: weights streamed from an unquantized checkpoint."""

from __future__ import annotations

from ..plugins.backend import format_bytes
from ..quant.scheme import DEFAULT_GROUP
from .placement import DEVICE, HOST, BudgetError


def refuse_streaming_requantized(graph, plan, path, quant) -> None:
    """Quantize-at-load holds packed weights on the device and in pinned host memory; a weight the
    plan streams from the checkpoint would be read at full width and quantized again every step
    (no bytes saved, a full quantization per use), so that plan is refused: quantize the
    checkpoint once and stage its packed tensors. The input embedding is exempt: a step reads only
    its tokens' rows, quantized as read (scales are per row, so exactly the same values)."""
    streamed = [w for w in graph.weights() if w.quant is not None and plan.tiers[w.name] not in (DEVICE, HOST)
                and not (w is graph.embed and not graph.tied)]
    if streamed:
        gs = "" if quant.group_size == DEFAULT_GROUP[quant.scheme] else f" --group-size {quant.group_size}"
        raise BudgetError(
            f"{path}: {format_bytes(sum(w.nbytes for w in streamed))} of {quant.label} weights would stream from "
            f"an unquantized checkpoint (re-quantized every step); write a quantized checkpoint once with "
            f"`ernie-hal quantize --model {path} --out DST --quantization {quant.scheme}{gs}` and load DST "
            f"(or raise --max-device-memory/--max-host-memory)")
