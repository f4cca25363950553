"""Fused packed weights: [q; k; v] and [gate; up] (dense MLP, shared experts, routed experts)
quantized part by part into the rows of one buffer and prepared once give exactly the logits and
greedy tokens of the same weights loaded one by one, on the CPU kernels as bound and on the
reference kernels and the emulated GPU (Triton) kernels, which read the [gate; up] parts as row
views of the fused buffer."""

import pytest
import torch

import ernie_hal
from ernie_hal.core.model.checkpoint_reader import Checkpoint
from ernie_hal.core.model.checkpoint_writer import write_random_checkpoint
from ernie_hal.core.model.config import ModelConfig
from ernie_hal.core.plugins.kernel_table import KernelTable
from ernie_hal.core.runtime.executor import ResidentWeights
from ernie_hal.kernels.reference import OPS_QUANT

# layer 0 dense, layers 1-2 MoE with 2 shared experts; untied head
CFG = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=384, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
                  moe_num_experts=4, moe_k=2, moe_intermediate_size=192, moe_num_shared_experts=2,
                  moe_layer_start_index=1, tie_word_embeddings=False)
IDS = list(range(3, 30))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_random_checkpoint(CFG, tmp_path_factory.mktemp("fused") / "bf16", seed=1, dtype="bfloat16")


def _run(m, weights):
    m.model.weights = weights
    logits = m.logits(IDS)
    greedy = m.generate(IDS, max_new_tokens=6, temperature=0, ignore_eos=True).token_ids
    return logits, greedy


@pytest.mark.parametrize("kernels", ["bound", "reference"])
@pytest.mark.parametrize("scheme,group", [("wint8", -1), ("wint4", 64)])
def test_fused_packed_weights_give_the_unfused_logits_exactly(source, scheme, group, kernels):
    m = ernie_hal.load(source, device="cpu", dtype="fp32", quantization=scheme, group_size=group)
    prepare = m.model.kernels.prepare_weight
    if kernels == "reference":
        m.model.kernels = KernelTable(ops=dict(OPS_QUANT))
        prepare = OPS_QUANT["prepare_weight"]

    def load(fuse):
        return ResidentWeights(m.model.graph, Checkpoint.open(source), m.backend, m.dtype, prepare=prepare, fuse=fuse)

    fused, unfused = load(True), load(False)
    for lw in fused.layers:
        assert lw.qkv is not None and lw.q.parent is not None
        assert lw.qkv.shape[0] == lw.q.shape[0] + lw.k.shape[0] + lw.v.shape[0]
    dense, moe = fused.layers[0], fused.layers[1]
    # both the reference (data/scales) and the CPU kernels (one GEMM over the parts' parent)
    # take row parts: [gate; up] fused too
    assert fused.fuse_gate_up
    gate, up, _ = dense.mlp
    assert gate.parent is up.parent and gate.parent.shape[0] == 2 * CFG.intermediate_size
    if gate.data.numel():          # kept (torch's int4pack ops without the native library hold their own copy)
        assert up.data.data_ptr() == gate.data.data_ptr() + gate.data.numel() * gate.data.element_size()
    eg, eu, _ = moe.experts
    assert eg.parent is eu.parent and eg.parent.shape == (4, 2 * 192, 256) and eg[3].parent is not None
    assert moe.shared[0].parent is moe.shared[1].parent
    assert all(lw.qkv is None for lw in unfused.layers)
    want_logits, want_ids = _run(m, unfused)
    got_logits, got_ids = _run(m, fused)
    assert torch.equal(got_logits, want_logits)
    assert got_ids == want_ids


def test_a_fused_packed_stored_checkpoint_loads_its_parts_exactly(source, tmp_path):
    """Reading a quantized checkpoint straight into the fused rows gives the parts as stored."""
    from ernie_hal.cli.main import main
    out = str(tmp_path / "q")
    assert main(["quantize", "--model", source, "--out", out, "--quantization", "wint4", "--group-size", "64"]) == 0
    m = ernie_hal.load(out, device="cpu", dtype="fp32")
    lw = ResidentWeights(m.model.graph, Checkpoint.open(out), m.backend, m.dtype,
                         prepare=OPS_QUANT["prepare_weight"], stored_quant=True).layers[1]
    with Checkpoint.open(out) as ck:
        name = "model.layers.1.mlp.experts.2.up_proj.weight"
        assert torch.equal(lw.experts[1][2].data, ck.read(name))
        assert torch.equal(lw.experts[1][2].scales, ck.read(name + "_scale"))
        assert torch.equal(lw.k.data, ck.read("model.layers.1.self_attn.k_proj.weight"))


def test_emulated_gpu_kernels_read_the_fused_parts_exactly():
    """The Triton packed kernels (emulated cuda binding) take [gate; up] as strided row parts of
    one fused stack: the same logits and greedy ids as separate stacks."""
    from ernie_hal.core.plugins.emulate import emulate, interpreter_problem
    if interpreter_problem():
        pytest.skip(interpreter_problem())
    m = ernie_hal.load("tiny-moe", device=emulate("cuda", "H100"), dtype="fp32", quantization="wint4",
                       group_size=32, allow_fallback=False)
    assert m.model.weights.fuse_gate_up          # the Triton kernels read data/scales: parts fuse
    ids = IDS[:12]
    fused = m.logits(ids), m.generate(ids, max_new_tokens=3, temperature=0, ignore_eos=True).token_ids
    m.model.weights = ResidentWeights(m.model.graph, Checkpoint.open(m.path), m.backend, m.dtype,
                                      prepare=m.model.kernels.prepare_weight, fuse=False)
    unfused = m.logits(ids), m.generate(ids, max_new_tokens=3, temperature=0, ignore_eos=True).token_ids
    # fp32 round-off only: the interpreter's tl.dot is numpy's matmul, whose BLAS kernel may sum
    # a strided part's tile in another order than a contiguous stack's (AVX2 hosts; bit-equal on AVX-512)
    torch.testing.assert_close(fused[0], unfused[0], rtol=1e-6, atol=1e-6)
    assert fused[1] == unfused[1]
