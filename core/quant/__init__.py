"""Weight-only quantization (wint8, wint4): the scheme, the packed format, quantize/dequantize
and the quantized checkpoint's names. One module set for the loader, the checkpoint writer,
staging and every kernel's tests; the math of dequantization lives in kernels/reference/dequant.py
(the bottom floor, so kernels can use it)."""

from ...kernels.reference.dequant import pack_int4, unpack_int4
from .format import PackedWeight, cat_rows, empty_packed
from .quantize import dequantize, pack, quantize, quantize_values
from .scheme import (DEFAULT_GROUP, QuantError, QuantSpec, from_config, is_quantized_role, resolve,
                     with_int8_activations)

__all__ = ["PackedWeight", "QuantSpec", "QuantError", "DEFAULT_GROUP", "cat_rows", "empty_packed",
           "quantize", "quantize_values", "dequantize", "pack", "pack_int4", "unpack_int4", "resolve",
           "from_config", "is_quantized_role", "with_int8_activations"]
