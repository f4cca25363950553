"""core/quant: the exact scheme (per row and group, s = max|w| / qmax, round half to even, clamp,
s = 0 -> q = 0), int4 packing, stacks and row concatenation, and the one-line errors."""

import pytest
import torch

import ernie_hal
from ernie_hal.cli.main import main
from ernie_hal.core.quant import (PackedWeight, QuantError, cat_rows, pack_int4, quantize, resolve,
                                  unpack_int4)


def test_defaults_and_group_size_validation():
    assert resolve("wint8") == resolve("wint8", -1)
    assert resolve("wint4").group_size == 128
    assert resolve("none") is None and resolve(None) is None
    for bad in (0, 16, 48, 100, -2):
        with pytest.raises(QuantError, match="power of two"):
            resolve("wint4", bad)
    with pytest.raises(QuantError, match="not a scheme"):
        resolve("int3")


def test_scheme_is_exact_on_known_values():
    spec = resolve("wint4", 32)
    w = torch.zeros(2, 64)
    w[0, :32] = torch.linspace(-7, 7, 32)       # s = 1: q = round-half-even(w)
    w[0, 0], w[0, 1], w[0, 2] = 7.0, 2.5, -0.5    # max |w| = 7 keeps s = 1; halves go to even
    w[0, 32:] = 0.0                               # an all-zero group: s = 0 -> q = 0
    w[1] = 3.0
    pw = quantize(w, spec)
    assert pw.scales.dtype == torch.float32 and pw.scales.shape == (2, 2)
    assert pw.scales[0, 0] == 1.0 and pw.scales[0, 1] == 0.0
    q = unpack_int4(pw.data)
    assert q[0, 1] == 2 and q[0, 2] == 0             # 2.5 -> 2, -0.5 -> 0 (half to even)
    assert (q[0, 32:] == 0).all()
    assert (q[1] == 7).all() and torch.allclose(pw.scales[1], torch.full((2,), 3 / 7))
    assert torch.equal(pw.dequantize()[1], 7 * pw.scales[1].repeat_interleave(32))


def test_wint8_per_channel_matches_the_formula():
    w = torch.randn(8, 96, generator=torch.Generator().manual_seed(0))
    pw = quantize(w, resolve("wint8", -1))
    s = w.abs().amax(1, keepdim=True) / 127
    assert torch.equal(pw.scales, s)
    assert torch.equal(pw.data, torch.round(w / s).clamp(-127, 127).to(torch.int8))
    assert torch.equal(pw.dequantize(), pw.data.float() * s)
    assert pw.nbytes == 8 * 96 + 8 * 4


def test_int4_pack_roundtrip_and_layout():
    q = torch.randint(-8, 8, (3, 10), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5)
    assert torch.equal(unpack_int4(packed), q)
    assert int(packed[0, 0]) == (int(q[0, 0]) + 8) | ((int(q[0, 1]) + 8) << 4)   # low nibble = even column


def test_stack_index_and_row_concat_equal_quantizing_parts():
    g = torch.Generator().manual_seed(1)
    spec = resolve("wint4", 32)
    a, b = torch.randn(16, 64, generator=g), torch.randn(8, 64, generator=g)
    fused = cat_rows([quantize(a, spec), quantize(b, spec)])
    whole = quantize(torch.cat([a, b]), spec)
    assert torch.equal(fused.data, whole.data) and torch.equal(fused.scales, whole.scales)
    stack = quantize(torch.stack([a[:8], b]), spec)
    assert isinstance(stack[1], PackedWeight) and torch.equal(stack[1].dequantize(), quantize(b, spec).dequantize())
    # a row slice (a tensor-parallel shard) quantizes to the slice of the whole
    assert torch.equal(quantize(a[4:12], spec).data, quantize(a, spec).data[4:12])


def test_indivisible_dimension_names_the_tensor():
    with pytest.raises(QuantError, match=r"model\.x\.weight: input dimension 96 .* group size 64"):
        quantize(torch.zeros(4, 96), resolve("wint4", 64), name="model.x.weight")


def test_load_with_bad_group_size_is_one_line(capsys):
    # the embedded default model has hidden size 64: groups of 128 do not divide it
    with pytest.raises(QuantError, match="not divisible by group size 128"):
        ernie_hal.load(None, device="cpu", quantization="wint4")
    assert main(["generate", "hi", "--device", "cpu", "--quantization", "wint4", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "group size 128" in err[0]
    assert main(["generate", "hi", "--device", "cpu", "--quantization", "wint8", "--group-size", "48",
                 "--max-new-tokens", "1"]) == 2
    assert "power of two" in capsys.readouterr().err


@pytest.mark.parametrize("scheme,group", [("wint8", -1), ("wint4", 32)])
def test_row_blocks_quantize_exactly_as_one_pass(monkeypatch, scheme, group):
    """quantize works a block of rows at a time (no whole-tensor fp32 copy); rows are computed
    alone, so blocks of any size give the one-pass values bit for bit."""
    import importlib
    qmod = importlib.import_module("ernie_hal.core.quant.quantize")   # the module, not the function
    spec = resolve(scheme, group)
    w = torch.randn(3, 37, 128, dtype=torch.bfloat16)            # a stack; 37 rows cut unevenly
    q, s = qmod.quantize_values(w, spec)
    one_pass = qmod.pack(q, spec)
    monkeypatch.setattr(qmod, "BLOCK_VALUES", 5 * 128)           # 5 rows a block
    pw = quantize(w, spec)
    assert torch.equal(pw.data, one_pass) and torch.equal(pw.scales, s)
