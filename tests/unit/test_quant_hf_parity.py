"""The main quantization oracle: with fp32 activations, a model quantized at load (wint8 / wint4,
group sizes 32, 64, 128 and per channel) gives the logits of Hugging Face transformers running
the same checkpoint with every quantized weight replaced by its dequantized values; dense and
MoE, shared experts 0 and 2, tied and untied head."""

import pytest
import torch

import ernie_hal
from ernie_hal.core.quant import is_quantized_role, quantize, resolve

transformers = pytest.importorskip("transformers")
from transformers import (Ernie4_5Config, Ernie4_5ForCausalLM, Ernie4_5_MoeConfig,  # noqa: E402
                          Ernie4_5_MoeForCausalLM)

# every input width (hidden 128, intermediate 256, expert width 128) divisible by 128
COMMON = dict(vocab_size=256, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
              max_position_embeddings=512, rope_theta=500000.0, rms_norm_eps=1e-5, use_bias=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
CASES = {
    "dense-tied": (Ernie4_5Config, Ernie4_5ForCausalLM,
                   dict(num_hidden_layers=2, intermediate_size=256, tie_word_embeddings=True)),
    # 2 shared experts (shared width 256), first layer dense
    "moe-shared2": (Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM,
                    dict(num_hidden_layers=3, intermediate_size=256, moe_num_experts=4, moe_k=2,
                         moe_intermediate_size=128, moe_num_shared_experts=2, moe_layer_start_index=1,
                         moe_layer_end_index=2, moe_layer_interval=1, tie_word_embeddings=True)),
    # no shared experts, untied lm_head, k = 3 of 5
    "moe-noshared-untied": (Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM,
                            dict(num_hidden_layers=3, intermediate_size=256, moe_num_experts=5, moe_k=3,
                                 moe_intermediate_size=128, moe_num_shared_experts=0, moe_layer_start_index=1,
                                 moe_layer_end_index=2, moe_layer_interval=1, tie_word_embeddings=False)),
}
SCHEMES = [("wint8", -1), ("wint8", 32), ("wint8", 64), ("wint8", 128),
           ("wint4", -1), ("wint4", 32), ("wint4", 64), ("wint4", 128)]


def _role(name: str) -> str:
    if "norm" in name:
        return "norm"
    if name.endswith("mlp.gate.weight") or "e_score_correction_bias" in name:
        return "router"
    return "attn"     # any 2-D projection or the embedding / head: quantized


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    cfg_cls, model_cls, extra = CASES[request.param]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**COMMON, **extra)).float().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if "norm" in name
                    else 0.15 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, path, model


def _dequantized_hf(model, spec):
    """A copy of the HF model whose quantized weights hold q * s (the tied table once)."""
    import copy
    hf = copy.deepcopy(model)
    seen = set()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            # transformers stacks experts as [E, 2I, H] / [E, H, I]: scales are per row and groups
            # run along the input, so quantizing the stack quantizes each expert's gate and up
            if p.dim() >= 2 and is_quantized_role(_role(name)) and id(p) not in seen:
                seen.add(id(p))
                p.copy_(quantize(p.detach(), spec, name=name).dequantize())
    return hf


def _prompt(n=20, seed=1):
    return torch.randint(3, COMMON["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("scheme,group", SCHEMES)
def test_quantized_logits_equal_transformers_on_dequantized_weights(case, scheme, group):
    name, path, model = case
    spec = resolve(scheme, group)
    ids = _prompt()
    ours = ernie_hal.load(str(path), device="cpu", dtype="fp32", quantization=scheme, group_size=group).logits(ids)
    with torch.no_grad():
        ref = _dequantized_hf(model, spec)(torch.tensor([ids])).logits[0].float()
        plain = model(torch.tensor([ids])).logits[0].float()
    assert _rel(ours, ref) < 1e-4, (name, scheme, group)
    # and quantization did something: the unquantized model's logits differ
    assert _rel(plain, ref) > 1e-3


def test_tied_model_keeps_one_packed_table(case):
    name, path, _ = case
    m = ernie_hal.load(str(path), device="cpu", dtype="fp32", quantization="wint8")
    w = m.model.weights
    assert type(w.embed).__name__ == "PackedWeight"
    assert (w.head is w.embed) == ("untied" not in name)
    # router and its bias stay fp32 tensors, norms untouched
    moe = [lw for lw in w.layers if lw.router is not None]
    for lw in moe:
        assert isinstance(lw.router, torch.Tensor) and lw.router.dtype == torch.float32
        assert isinstance(lw.bias, torch.Tensor)
    assert all(isinstance(lw.input_norm, torch.Tensor) for lw in w.layers)
