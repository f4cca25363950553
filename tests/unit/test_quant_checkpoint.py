"""`ernie-hal quantize`: the quantized checkpoint loads to exactly the logits of quantize-at-load,
is 2x (wint8) / ~4x (wint4) smaller to read, is written atomically, copies the tokenizer, and
refuses a mismatched --quantization with one line."""

import json
import os

import pytest
import torch

import ernie_hal
from ernie_hal.cli.main import main
from ernie_hal.core.model.checkpoint_reader import Checkpoint
from ernie_hal.core.model.checkpoint_writer import write_random_checkpoint
from ernie_hal.core.model.config import ModelConfig
from ernie_hal.core.quant import QuantError

CFG = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
                  moe_num_experts=4, moe_k=2, moe_intermediate_size=256, moe_num_shared_experts=2,
                  moe_layer_start_index=1, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("src") / "bf16")
    write_random_checkpoint(CFG, path, seed=0, dtype="bfloat16")
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:   # a file to be copied along
        json.dump({"marker": 1}, f)
    return path


@pytest.mark.parametrize("scheme,group,ratio", [("wint8", -1, 1.9), ("wint4", 128, 3.5)])
def test_written_checkpoint_equals_quantize_at_load(source, tmp_path, scheme, group, ratio, capsys):
    out = str(tmp_path / scheme)
    shard = ["--shard-size", "300KB"] if scheme == "wint4" else []    # several shards + index too
    assert main(["quantize", "--model", source, "--out", out, "--quantization", scheme,
                 "--group-size", str(group), *shard]) == 0
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["quantization_config"]["scheme"] == scheme and cfg["quantization_config"]["group_size"] == group
    assert json.load(open(os.path.join(out, "tokenizer_config.json"))) == {"marker": 1}
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]   # no temp dir left behind
    src_bytes = Checkpoint.open(source).total_bytes
    q_bytes = Checkpoint.open(out).total_bytes
    assert src_bytes / q_bytes > ratio
    ids = list(range(3, 30))
    at_load = ernie_hal.load(source, device="cpu", dtype="fp32", quantization=scheme, group_size=group)
    written = ernie_hal.load(out, device="cpu", dtype="fp32")        # the checkpoint's own scheme
    assert torch.equal(at_load.logits(ids), written.logits(ids))
    g1 = at_load.generate(ids, max_new_tokens=8, temperature=0, ignore_eos=True).token_ids
    assert written.generate(ids, max_new_tokens=8, temperature=0, ignore_eos=True).token_ids == g1
    # the same scheme named explicitly loads too; another one is a clear one-line error
    ernie_hal.load(out, device="cpu", dtype="fp32", quantization=scheme)
    other = "wint4" if scheme == "wint8" else "wint8"
    for q in (other, "none"):
        with pytest.raises(QuantError, match="quantized checkpoint"):
            ernie_hal.load(out, device="cpu", quantization=q)
    capsys.readouterr()
    assert main(["generate", "hi", "--model", out, "--device", "cpu", "--quantization", other]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "quantized checkpoint" in err[0]


def test_quantize_refuses_nonempty_out_and_bad_group(source, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "x").write_text("keep")
    assert main(["quantize", "--model", source, "--out", str(out), "--quantization", "wint8"]) == 2
    assert (out / "x").read_text() == "keep"
    assert main(["quantize", "--model", source, "--out", str(tmp_path / "g"), "--quantization", "wint4",
                 "--group-size", "512"]) == 2       # 512 does not divide hidden 256
    assert "not divisible by group size 512" in capsys.readouterr().err
    assert not (tmp_path / "g").exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_reports_say_the_scheme_and_weight_bytes(source, capsys):
    plain = ernie_hal.load(source, device="cpu")
    q = ernie_hal.load(source, device="cpu", quantization="wint4", group_size=64)
    info = q.quantization
    assert info["scheme"] == "wint4" and info["group_size"] == 64
    assert plain.quantization["scheme"] == "none"
    assert plain.quantization["weight_bytes"] / info["weight_bytes"] > 3
    assert q.generate([5, 6], max_new_tokens=2, temperature=0).metrics["quantization"] == info
    from ernie_hal.serve.metrics import ServerMetrics
    stats = {"num_steps": 0, "num_waiting": 0, "num_running": 0, "kv_usage": 0.0, "kv_blocks_free": 1,
             "kv_blocks_total": 1, "quantization": info}
    text = ServerMetrics().render(stats)
    line = next(l for l in text.splitlines() if l.startswith("ernie_hal_weight_bytes{"))
    assert 'quantization="wint4"' in line and 'group_size="64"' in line
    assert float(line.rsplit(" ", 1)[1]) == info["weight_bytes"]
    assert main(["generate", "hi", "--device", "cpu", "--quantization", "wint8",   # the embedded tiny model
                 "--max-new-tokens", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["metrics"]["quantization"]["scheme"] == "wint8"


def test_quantize_at_load_that_must_stream_is_a_clear_error(source):
    """Streaming packed weights needs a quantized checkpoint (tests/unit/test_quant_staging.py)."""
    with pytest.raises(ValueError, match="would stream from an unquantized checkpoint.*ernie-hal quantize --model "):
        ernie_hal.load(source, device="cpu", quantization="wint8", max_device_memory="2MiB")


def test_placement_counts_packed_bytes(source):
    """A budget the bf16 weights overflow holds the wint4 model resident."""
    from ernie_hal.core.memory.placement import plan
    from ernie_hal.core.model.graph import build
    from ernie_hal.core.quant import resolve
    from ernie_hal.backends.cpu.backend import CpuBackend
    plain, packed = build(CFG), build(CFG, quant=resolve("wint4", 128))
    budget = plain.total_bytes // 2 + 2**20
    assert packed.total_bytes < budget < plain.total_bytes
    assert plan(packed, CpuBackend(), budget, None, "auto", torch.bfloat16).fully_resident
    assert not plan(plain, CpuBackend(), budget, None, "auto", torch.bfloat16).fully_resident



@pytest.mark.parametrize("scheme,group", [("wint8", -1), ("wint4", 64)])
def test_row_blocks_equal_whole_tensor_quantization(source, tmp_path, scheme, group):
    """Blocks of 7 rows (512 rows: the last block is short) give bit for bit the whole tensor's
    quantization, and a checkpoint written in such tiny blocks is byte-identical to one written in
    the default blocks."""
    from ernie_hal.core.model.quantized_writer import copy_blocks, quantized_blocks, write_quantized_checkpoint
    from ernie_hal.core.quant.quantize import quantize
    from ernie_hal.core.quant.scheme import resolve

    spec = resolve(scheme, group)
    name = "model.embed_tokens.weight"
    with Checkpoint.open(source) as ckpt:
        whole = quantize(ckpt.read(name), spec, name=name)
        rows = 512
        assert ckpt.ref(name).shape == (rows, 256) and rows % 7
        seen = []
        for data, scales, start in quantized_blocks(ckpt, name, spec, block_bytes=7 * 256 * 2):
            assert data.shape[0] == scales.shape[0] == (7 if start + 7 <= rows else rows % 7)
            seen.append(start)
            assert torch.equal(data, whole.data[start:start + data.shape[0]])
            assert torch.equal(scales, whole.scales[start:start + data.shape[0]])
        assert seen == list(range(0, rows, 7))
        norm = "model.norm.weight"
        raw = torch.cat([b.clone() for b in copy_blocks(ckpt, norm, block_bytes=100)])
        assert torch.equal(raw.view(ckpt.ref(norm).dtype), ckpt.read(norm))
    small, default = str(tmp_path / "small"), str(tmp_path / "default")
    write_quantized_checkpoint(source, small, spec, block_bytes=1000)     # < one row of most weights
    write_quantized_checkpoint(source, default, spec)
    for f in sorted(os.listdir(default)):
        assert open(os.path.join(small, f), "rb").read() == open(os.path.join(default, f), "rb").read(), f
