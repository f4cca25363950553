"""Parity with Hugging Face transformers (the reference): random checkpoints written by
transformers' own save_pretrained, loaded by ernie-hal, logits and greedy ids compared."""

import pytest
import torch

import ernie_hal

transformers = pytest.importorskip("transformers")
from transformers import (Ernie4_5Config, Ernie4_5ForCausalLM, Ernie4_5_MoeConfig,  # noqa: E402
                          Ernie4_5_MoeForCausalLM)

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rope_theta=500000.0, rms_norm_eps=1e-5,
              use_bias=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)

CASES = {
    # head_dim 32 != hidden/heads (16): the 0.3B trap
    "dense-headdim": (Ernie4_5Config, Ernie4_5ForCausalLM,
                      dict(num_hidden_layers=2, head_dim=32, tie_word_embeddings=True)),
    # 21B-like: 2 shared experts, first layer dense (moe_layer_start_index 1), tied head
    "moe-shared2": (Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM,
                    dict(num_hidden_layers=3, head_dim=16, moe_num_experts=8, moe_k=2,
                         moe_intermediate_size=32, moe_num_shared_experts=2, moe_layer_start_index=1,
                         moe_layer_end_index=2, moe_layer_interval=1, tie_word_embeddings=True)),
    # 300B-like: no shared experts, two leading dense layers, untied lm_head, k = 3 of 5 (odd E)
    "moe-noshared-untied": (Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM,
                            dict(num_hidden_layers=4, head_dim=16, moe_num_experts=5, moe_k=3,
                                 moe_intermediate_size=24, moe_num_shared_experts=0, moe_layer_start_index=2,
                                 moe_layer_end_index=3, moe_layer_interval=1, tie_word_embeddings=False)),
}


def _randomize(model, seed):
    """HF's init is near-zero (std 0.02) and the correction bias starts at zero; make every
    weight matter, including the selection-only bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.05 * torch.randn(b.shape, generator=g))


def _hf_checkpoint(tmp_path_factory, case, seed=0, shard=None):
    cfg_cls, model_cls, extra = CASES[case]
    config = cfg_cls(**COMMON, **extra)
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    _randomize(model, seed)
    out = tmp_path_factory.mktemp(case)
    model.save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
    return out, model


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    path, hf = _hf_checkpoint(tmp_path_factory, request.param)
    return request.param, path, hf


def _prompt(n=24, seed=1):
    return torch.randint(3, COMMON["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_fp32_logits_match_transformers_at_every_position(case):
    name, path, hf = case
    ids = _prompt()
    ours = ernie_hal.load(str(path), device="cpu", dtype="fp32").logits(ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    assert ours.shape == ref.shape
    assert _rel(ours, ref) < 1e-4, name


def test_fp32_greedy_32_tokens_identical_to_transformers(case):
    name, path, hf = case
    ids = _prompt(12, seed=2)
    model = ernie_hal.load(str(path), device="cpu", dtype="fp32")
    ours = model.generate(ids, max_new_tokens=32, temperature=0, ignore_eos=True).token_ids
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, pad_token_id=0)
    assert ours == ref[0, len(ids):].tolist(), name


def test_repetition_penalty_greedy_identical_to_transformers(case):
    """Hugging Face's repetition penalty (over prompt and output) gives HF's greedy ids."""
    name, path, hf = case
    ids = _prompt(12, seed=3)
    model = ernie_hal.load(str(path), device="cpu", dtype="fp32")
    ours = model.generate(ids, max_new_tokens=24, temperature=0, ignore_eos=True, repetition_penalty=1.5).token_ids
    plain = model.generate(ids, max_new_tokens=24, temperature=0, ignore_eos=True).token_ids
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, pad_token_id=0,
                          repetition_penalty=1.5)
    assert ours == ref[0, len(ids):].tolist(), name
    assert ours != plain, "the penalty changed nothing: the test would not catch a no-op"


def test_sharded_checkpoint_gives_same_logits(tmp_path_factory):
    path, hf = _hf_checkpoint(tmp_path_factory, "moe-shared2", shard="40KB")
    assert (path / "model.safetensors.index.json").exists()
    ids = _prompt()
    ours = ernie_hal.load(str(path), device="cpu", dtype="fp32").logits(ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    assert _rel(ours, ref) < 1e-4


@pytest.mark.parametrize("name", ["dense-headdim", "moe-shared2"])
def test_bf16_checkpoint_matches_transformers_within_bf16_tolerance(name, tmp_path_factory):
    fp32_path, _ = _hf_checkpoint(tmp_path_factory, name)
    model_cls = CASES[name][1]
    # from_pretrained keeps the router and its bias in fp32 (_keep_in_fp32_modules), like the hub files
    hf = model_cls.from_pretrained(fp32_path, dtype=torch.bfloat16).eval()
    bf16_path = tmp_path_factory.mktemp(name + "-bf16")
    hf.save_pretrained(bf16_path)
    ids = _prompt()
    model = ernie_hal.load(str(bf16_path), device="cpu", dtype="bf16")
    ours = model.logits(ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    assert _rel(ours, ref) < 3e-2
    # most positions agree on the argmax despite bf16 rounding differences
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
