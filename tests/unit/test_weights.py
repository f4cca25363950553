"""Checkpoint reader: exact round trips, out= conversions, page release, and every error message
naming the file, the tensor, what was expected and what was found."""

import json
import os
import shutil
import struct

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from ernie_hal.core.model.checkpoint_writer import shard_header, write_random_checkpoint
from ernie_hal.core.model.config import ConfigError, preset
from ernie_hal.core.model.names import EMBED, LM_HEAD
from ernie_hal.core.model.checkpoint_reader import INDEX, Checkpoint, CheckpointError, PaddleFormatError

ROUTER = "model.layers.1.mlp.gate.weight"          # fp32 in the checkpoint
BIAS = "model.layers.1.mlp.moe_statics.e_score_correction_bias"
EXPERT = "model.layers.1.mlp.experts.3.up_proj.weight"


@pytest.fixture(scope="module")
def ckpt_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    cfg = preset("tiny-moe")
    return {"single": write_random_checkpoint(cfg, root / "single", seed=3),
            "sharded": write_random_checkpoint(cfg, root / "sharded", seed=3, max_shard_bytes=40_000),
            "fp16": write_random_checkpoint(cfg, root / "fp16", seed=3, dtype="float16")}


@pytest.fixture
def single(ckpt_dirs, tmp_path):
    """A private copy to damage."""
    return shutil.copytree(ckpt_dirs["single"], tmp_path / "ckpt")


@pytest.fixture
def sharded(ckpt_dirs, tmp_path):
    return shutil.copytree(ckpt_dirs["sharded"], tmp_path / "ckpt")


def _edit_config(path, **changes):
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        raw = json.load(f)
    raw.update(changes)
    with open(cfg_path, "w") as f:
        json.dump(raw, f)


def _rewrite(path, change):
    """Apply change(dict of tensors) to the single model.safetensors."""
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    change(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


# ---- round trips ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["single", "sharded", "fp16"])
def test_round_trip_matches_safetensors(ckpt_dirs, kind):
    path = ckpt_dirs[kind]
    expected = {}
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            expected.update(load_file(os.path.join(path, f)))
    with Checkpoint.open(path) as ck:
        assert sorted(ck.names) == sorted(expected)
        assert ck.validate() == []
        assert ck.total_bytes == sum(t.numel() * t.element_size() for t in expected.values())
        for name in ck.names:
            got = ck.read(name)
            assert got.dtype == expected[name].dtype and torch.equal(got, expected[name]), name
        assert (ck.index is not None) == (kind == "sharded")
        assert len(ck.files) > 1 if kind == "sharded" else len(ck.files) == 1


def test_refs_describe_the_data(ckpt_dirs):
    with Checkpoint.open(ckpt_dirs["single"]) as ck:
        r = ck.ref(ROUTER)
        assert (r.shape, r.dtype, r.nbytes) == ((8, 64), torch.float32, 8 * 64 * 4)
        assert ck.ref(BIAS).shape == (1, 8) and ck.has(EXPERT) and EXPERT in ck and not ck.has("nope")
        with open(r.file, "rb") as f:
            f.seek(r.offset)
            assert torch.equal(torch.frombuffer(bytearray(f.read(r.nbytes)), dtype=torch.float32).view(8, 64),
                               ck.read(ROUTER))
        with pytest.raises(CheckpointError, match="no tensor named 'nope'"):
            ck.read("nope")


# ---- out= and dtype conversion -------------------------------------------------------------
@pytest.mark.parametrize("kind,name,target", [
    ("single", EXPERT, torch.float32),   # bf16 -> fp32
    ("single", ROUTER, torch.bfloat16),  # fp32 router -> bf16
    ("fp16", EXPERT, torch.float32),     # fp16 -> fp32
    ("fp16", EXPERT, torch.bfloat16),    # fp16 -> bf16
])
def test_read_into_out_of_another_dtype(ckpt_dirs, kind, name, target):
    with Checkpoint.open(ckpt_dirs[kind]) as ck:
        ref = ck.read(name)
        out = torch.full(ck.ref(name).shape, float("nan"), dtype=target)
        got = ck.read(name, out=out)
        assert got is out and torch.equal(out, ref.to(target))
        assert torch.equal(ck.read(name, dtype=target), ref.to(target))


def test_read_into_a_slice_and_a_reshaped_out(ckpt_dirs):
    with Checkpoint.open(ckpt_dirs["single"]) as ck:
        stack = torch.zeros(2, 32, 64, dtype=torch.bfloat16)
        ck.read(EXPERT, out=stack[1])                 # the loader stacks experts this way
        assert torch.equal(stack[1], ck.read(EXPERT)) and not stack[0].any()
        flat = torch.empty(8)                         # [1, E] bias into [E]
        assert torch.equal(ck.read(BIAS, out=flat), ck.read(BIAS).view(8))
        with pytest.raises(ValueError, match=r"out has shape \[7\], the tensor has \[1, 8\]"):
            ck.read(BIAS, out=torch.empty(7))
        with pytest.raises(ValueError, match="dtype"):
            ck.read(BIAS, out=flat, dtype=torch.float16)


def test_read_copies_out_of_the_mapping_and_view_does_not(ckpt_dirs):
    ck = Checkpoint.open(ckpt_dirs["single"])
    got = ck.read(EXPERT)
    mm = ck._shards[ck.ref(EXPERT).file].mm
    base = torch.frombuffer(mm, dtype=torch.uint8).data_ptr()
    assert not base <= got.data_ptr() < base + len(mm)           # read: a copy
    ck.close()
    assert mm.closed and torch.equal(got, got.clone())           # nothing kept the mapping


def test_view_is_zero_copy_and_outlives_close(ckpt_dirs):
    ck = Checkpoint.open(ckpt_dirs["single"])
    view, expected = ck.view(EMBED), ck.read(EMBED)
    mm = ck._shards[ck.ref(EMBED).file].mm
    base = torch.frombuffer(mm, dtype=torch.uint8).data_ptr()
    assert base <= view.data_ptr() < base + len(mm)              # inside the mapping
    ck.close()
    assert not mm.closed and torch.equal(view, expected)         # still mapped for the view
    del mm, base


def test_misaligned_data_is_read_correctly(tmp_path, ckpt_dirs):
    # safetensors does not pad: an odd-length bf16 tensor first puts the fp32 one off alignment
    shutil.copy(os.path.join(ckpt_dirs["single"], "config.json"), tmp_path)
    a, b = torch.randn(3).bfloat16(), torch.randn(5)
    entries = [("a", (3,), torch.bfloat16, 6), ("b", (5,), torch.float32, 20)]
    with open(tmp_path / "model.safetensors", "wb") as f:
        f.write(shard_header(entries) + a.view(torch.uint8).numpy().tobytes() + b.numpy().tobytes())
    with Checkpoint.open(tmp_path) as ck:
        assert ck.ref("b").offset % 4 == 2
        assert torch.equal(ck.read("a"), a) and torch.equal(ck.read("b"), b)
        assert torch.equal(load_file(tmp_path / "model.safetensors")["b"], ck.read("b"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA/ROCm device")
def test_read_into_device_and_pinned(ckpt_dirs):
    with Checkpoint.open(ckpt_dirs["single"]) as ck:
        ref = ck.read(EXPERT)
        pinned = torch.empty(ref.shape, dtype=ref.dtype, pin_memory=True)
        assert torch.equal(ck.read(EXPERT, out=pinned), ref)
        dev = torch.empty(ref.shape, dtype=torch.float32, device="cuda")
        assert torch.equal(ck.read(EXPERT, out=dev).cpu(), ref.float())
        assert torch.equal(ck.read(ROUTER, device="cuda").cpu(), ck.read(ROUTER))


# ---- page cache release --------------------------------------------------------------------
def test_release_by_name_file_and_all_keeps_reads_correct(ckpt_dirs):
    with Checkpoint.open(ckpt_dirs["sharded"]) as ck:
        before = {n: ck.read(n) for n in ck.names}
        ck.release(EXPERT)
        ck.release(os.path.basename(ck.files[0]))
        ck.release(ck.files[-1])
        ck.release()
        assert torch.equal(ck.read(EXPERT, release=True), before[EXPERT])
        assert all(torch.equal(ck.read(n), t) for n, t in before.items())
        with pytest.raises(CheckpointError, match="neither a tensor nor a file"):
            ck.release("other.safetensors")


@pytest.mark.skipif(not hasattr(os, "posix_fadvise") or not os.path.exists("/proc/self/smaps"),
                    reason="needs Linux madvise/posix_fadvise")
def test_release_returns_mapped_pages(tmp_path):
    # a 32 MiB embedding: touching it through view() maps its pages, release() must unmap them
    cfg = preset("tiny").replace(vocab_size=65536, hidden_size=256, intermediate_size=256,
                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    path = write_random_checkpoint(cfg, tmp_path / "big")
    proc = psutil.Process()
    with Checkpoint.open(path) as ck:
        view = ck.view(EMBED)
        base = proc.memory_info().rss
        assert view.float().abs().sum() > 0               # fault every page in
        touched = proc.memory_info().rss
        del view
        ck.release(EMBED)
        released = proc.memory_info().rss
    assert touched - base > 24 * 2**20
    assert touched - released > 24 * 2**20


# ---- validation and the lm_head rule -------------------------------------------------------
def test_mtp_keys_are_ignored(single):
    _rewrite(single, lambda t: t.update({"model.mtp_block.0.input_layernorm.weight": torch.ones(64).bfloat16(),
                                         "model.mtp_linear_proj.0.weight": torch.zeros(128, 64).bfloat16()}))
    with Checkpoint.open(single) as ck:
        assert ck.has("model.mtp_linear_proj.0.weight")
        assert ck.validate() == []


def test_unused_tensors_are_reported_not_fatal(single):
    _rewrite(single, lambda t: t.update({"model.extra.weight": torch.ones(2).bfloat16()}))
    with Checkpoint.open(single) as ck:
        assert ck.validate() == ["model.extra.weight"]


@pytest.mark.parametrize("tied,present,head", [
    (False, True, LM_HEAD),   # untied and stored: the real head
    (False, False, EMBED),    # says untied but absent: fall back to the embedding (docs/model.md 1.2)
    (True, True, EMBED),      # tied: a stored lm_head is ignored
    (True, False, EMBED),
])
def test_lm_head_rule(single, tied, present, head):
    _edit_config(single, tie_word_embeddings=tied)
    if present:
        _rewrite(single, lambda t: t.update({LM_HEAD: torch.randn(512, 64).bfloat16()}))
    with Checkpoint.open(single) as ck:
        assert ck.lm_head_name == head
        assert ck.validate() == []


def test_untied_checkpoint_with_head_validates_against_graph(tmp_path):
    from ernie_hal.core.model.graph import build
    path = write_random_checkpoint(preset("tiny").replace(tie_word_embeddings=False), tmp_path / "untied")
    with Checkpoint.open(path) as ck:
        assert ck.lm_head_name == LM_HEAD
        assert ck.validate(build(ck.config, untied_head=True).expected_tensors()) == []


# ---- errors ----------------------------------------------------------------------------------
def test_missing_tensor_in_index(sharded):
    index = os.path.join(sharded, INDEX)
    with open(index) as f:
        raw = json.load(f)
    del raw["weight_map"][EXPERT]
    with open(index, "w") as f:
        json.dump(raw, f)
    with Checkpoint.open(sharded) as ck:
        with pytest.raises(CheckpointError) as e:
            ck.validate()
    msg = str(e.value)
    assert index in msg and repr(EXPERT) in msg and "expected shape [32, 64] bfloat16" in msg
    assert "found no such tensor" in msg and "re-download" in msg


def test_index_points_to_missing_file(sharded):
    with open(os.path.join(sharded, INDEX)) as f:
        weight_map = json.load(f)["weight_map"]
    shard = weight_map[EXPERT]
    os.remove(os.path.join(sharded, shard))
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(sharded)
    msg = str(e.value)
    assert INDEX in msg and shard in msg and "found none" in msg and "fetch" in msg
    assert any(repr(n) in msg for n, f in weight_map.items() if f == shard)


def test_index_names_tensor_its_file_lacks(sharded):
    index = os.path.join(sharded, INDEX)
    with open(index) as f:
        raw = json.load(f)
    raw["weight_map"]["model.layers.0.self_attn.q_proj.weight"] = raw["weight_map"][EXPERT]
    raw["weight_map"][EXPERT] = raw["weight_map"][EMBED]
    with open(index, "w") as f:
        json.dump(raw, f)
    with pytest.raises(CheckpointError, match="weight_map says tensor .* is in model-0000"):
        Checkpoint.open(sharded)


def test_truncated_file(single):
    f = os.path.join(single, "model.safetensors")
    size = os.path.getsize(f)
    os.truncate(f, size - 100)
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(single)
    msg = str(e.value)
    assert f in msg and "truncated" in msg and f"needs bytes up to {size}" in msg
    assert f"found a file of {size - 100} bytes" in msg and "tensor '" in msg and "re-download" in msg


def test_corrupt_header_json(single):
    f = os.path.join(single, "model.safetensors")
    with open(f, "r+b") as fh:
        fh.seek(8)
        fh.write(b"{not json")
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(single)
    msg = str(e.value)
    assert f in msg and "corrupt safetensors header" in msg and "expected JSON, found invalid data" in msg


def test_header_length_larger_than_file(single):
    f = os.path.join(single, "model.safetensors")
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.write(struct.pack("<Q", size + 1))
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(single)
    msg = str(e.value)
    assert f in msg and f"header length is {size + 1} bytes, expected at most {size - 8}" in msg


def test_header_entry_with_wrong_byte_count(tmp_path, ckpt_dirs):
    shutil.copy(os.path.join(ckpt_dirs["single"], "config.json"), tmp_path)
    with open(tmp_path / "model.safetensors", "wb") as f:
        f.write(shard_header([("x", (4,), torch.float32, 12)]) + bytes(12))
    with pytest.raises(CheckpointError, match=r"tensor 'x' spans 12 bytes, expected 16 for shape \[4\] F32"):
        Checkpoint.open(tmp_path)


def test_wrong_dtype(single):
    _rewrite(single, lambda t: t.update({EXPERT: t[EXPERT].half()}))
    with Checkpoint.open(single) as ck:
        with pytest.raises(CheckpointError) as e:
            ck.validate()
    msg = str(e.value)
    assert os.path.join(single, "model.safetensors") in msg and repr(EXPERT) in msg
    assert "expected shape [32, 64] bfloat16, found [32, 64] float16" in msg and "torch_dtype" in msg


def test_wrong_shape(single):
    _edit_config(single, moe_intermediate_size=48)
    with Checkpoint.open(single) as ck:
        with pytest.raises(CheckpointError) as e:
            ck.validate()
    msg = str(e.value)
    assert os.path.join(single, "model.safetensors") in msg and "experts.0.gate_proj.weight" in msg
    assert "expected shape [48, 64] bfloat16, found [32, 64] bfloat16" in msg and "more tensors differ" in msg
    assert "config.json does not describe these weights" in msg


def test_paddle_checkpoint_gets_its_own_error(single):
    _rewrite(single, lambda t: t.update({"ernie.layers.0.self_attn.qkv_proj.weight": torch.zeros(64, 128).bfloat16()}))
    with pytest.raises(PaddleFormatError) as e:
        Checkpoint.open(single)
    assert "Paddle-format" in str(e.value) and "-PT" in str(e.value) and "qkv_proj" in str(e.value)


def test_several_files_without_index(single):
    tensors = load_file(os.path.join(single, "model.safetensors"))
    os.remove(os.path.join(single, "model.safetensors"))
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[:40]}, os.path.join(single, "a.safetensors"))
    save_file({n: tensors[n] for n in names[40:]}, os.path.join(single, "b.safetensors"))
    with Checkpoint.open(single) as ck:
        assert ck.validate() == [] and len(ck.files) == 2
        assert torch.equal(ck.read(EXPERT), tensors[EXPERT])
    save_file({names[0]: tensors[names[0]]}, os.path.join(single, "c.safetensors"))
    with pytest.raises(CheckpointError, match="is in both a.safetensors and c.safetensors"):
        Checkpoint.open(single)


def test_directory_problems(tmp_path, single):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        Checkpoint.open(tmp_path / "absent")
    os.remove(os.path.join(single, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"no model.safetensors, .*\*.safetensors files"):
        Checkpoint.open(single)
    os.remove(os.path.join(single, "config.json"))
    with pytest.raises(ConfigError, match="needs a config.json"):
        Checkpoint.open(single)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise") or not os.path.exists("/proc/self/smaps"),
                    reason="needs Linux madvise/posix_fadvise")
def test_read_slice_of_rows_releases_only_those_rows(tmp_path):
    # a tensor read block by block (quantize at load) must keep the pages of the rows not read yet
    cfg = preset("tiny").replace(vocab_size=65536, hidden_size=256, intermediate_size=256,
                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    path = write_random_checkpoint(cfg, tmp_path / "big")
    proc = psutil.Process()
    with Checkpoint.open(path) as ck:
        half = ck.ref(EMBED).shape[0] // 2
        out = torch.ones(half, 256, dtype=ck.ref(EMBED).dtype)      # resident before measuring
        view = ck.view(EMBED)
        assert view.sum() != 0                                       # fault all 32 MiB in
        expected = view[:half].clone()
        del view
        touched = proc.memory_info().rss
        ck.read_slice(EMBED, out, 0, 0, half, release=True)
        first = proc.memory_info().rss
        assert torch.equal(out, expected)
        ck.read_slice(EMBED, out, 0, half, 2 * half, release=True)
        second = proc.memory_info().rss
    assert 12 * 2**20 < touched - first < 20 * 2**20      # half of the 32 MiB dropped, not all of it
    assert first - second > 12 * 2**20
