"""Random-weight writer: transformers loads it with no missing keys, sharding does not change a
value, writes are atomic and streaming; names.py agrees with the spec and with graph.py."""

import json
import os
import threading
import time

import psutil
import pytest
import torch

from ernie_hal.core.model import checkpoint_writer as C
from ernie_hal.core.model.checkpoint_writer import random_tensor, write_random_checkpoint
from ernie_hal.core.model.config import PRESETS, preset
from ernie_hal.core.model.names import LM_HEAD, expected_tensors
from ernie_hal.core.model.checkpoint_reader import INDEX, Checkpoint


def _tensors(path):
    with Checkpoint.open(path) as ck:
        return {n: ck.read(n) for n in ck.names}


# ---- names.py --------------------------------------------------------------------------------
def test_names_match_the_spec_for_21b():
    t = expected_tensors(PRESETS["ernie-4.5-21b-a3b"])
    assert len(t) == 5492                               # docs/model.md 3.1
    assert t["model.layers.0.mlp.gate_proj.weight"] == ((12288, 2560), torch.bfloat16)
    assert t["model.layers.1.mlp.gate.weight"] == ((64, 2560), torch.float32)
    assert t["model.layers.27.mlp.moe_statics.e_score_correction_bias"] == ((1, 64), torch.float32)
    assert t["model.layers.5.mlp.experts.63.down_proj.weight"] == ((2560, 1536), torch.bfloat16)
    assert t["model.layers.5.mlp.shared_experts.up_proj.weight"] == ((3072, 2560), torch.bfloat16)
    assert t["model.layers.3.self_attn.k_proj.weight"] == ((512, 2560), torch.bfloat16)
    assert LM_HEAD not in t


def test_names_for_03b_and_300b():
    t = expected_tensors(PRESETS["ernie-4.5-0.3b"])
    assert t["model.layers.0.self_attn.q_proj.weight"][0] == (2048, 1024)   # head_dim 128 != 1024/16
    assert t["model.layers.17.self_attn.o_proj.weight"][0] == (1024, 2048)
    t = expected_tensors(PRESETS["ernie-4.5-300b-a47b"])
    assert t[LM_HEAD] == ((103424, 8192), torch.bfloat16)
    assert "model.layers.2.mlp.down_proj.weight" in t and "model.layers.3.mlp.gate.weight" in t
    assert not any("shared_experts" in n for n in t)
    assert LM_HEAD not in expected_tensors(PRESETS["ernie-4.5-300b-a47b"], include_lm_head=False)


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("untied", [False, True])
def test_names_agree_with_graph(name, untied):
    from ernie_hal.core.model.graph import build
    cfg = preset(name)
    assert expected_tensors(cfg, include_lm_head=untied) == build(cfg, untied_head=untied).expected_tensors()


# ---- transformers compatibility ----------------------------------------------------------------
@pytest.mark.parametrize("name,untied", [("tiny-moe", False), ("tiny", False), ("tiny", True)])
def test_transformers_loads_without_missing_keys(tmp_path, name, untied):
    transformers = pytest.importorskip("transformers")
    cfg = preset(name).replace(tie_word_embeddings=not untied)
    path = write_random_checkpoint(cfg, tmp_path / name, seed=1)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert {k: set(v) for k, v in info.items() if k != "error_msgs"} == {
        "missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set()}
    ours, sd = _tensors(path), model.state_dict()
    assert torch.equal(sd["model.embed_tokens.weight"].to(torch.bfloat16), ours["model.embed_tokens.weight"])
    if untied:
        assert torch.equal(sd[LM_HEAD].to(torch.bfloat16), ours[LM_HEAD])
    if cfg.is_moe:
        # transformers v5 fuses experts into gate_up_proj [E, 2I, H], gate rows first (docs/model.md 3.4)
        gate_up = sd["model.layers.1.mlp.experts.gate_up_proj"][3].to(torch.bfloat16)
        assert torch.equal(gate_up, torch.cat([ours["model.layers.1.mlp.experts.3.gate_proj.weight"],
                                               ours["model.layers.1.mlp.experts.3.up_proj.weight"]]))
        router = sd["model.layers.1.mlp.gate.weight"]
        assert router.dtype == torch.float32 and torch.equal(router, ours["model.layers.1.mlp.gate.weight"])


# ---- content ---------------------------------------------------------------------------------
def test_files_config_and_initialisation(tmp_path):
    path = write_random_checkpoint(preset("tiny-moe"), tmp_path / "m", seed=5)
    assert sorted(os.listdir(path)) == ["config.json", "generation_config.json", "model.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o777 & ~umask              # a plain mkdir's mode
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    assert raw["architectures"] == ["Ernie4_5_MoeForCausalLM"] and raw["torch_dtype"] == "bfloat16"
    with open(os.path.join(path, "generation_config.json")) as f:
        assert json.load(f) == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    t = _tensors(path)
    norm = t["model.layers.0.input_layernorm.weight"].float()
    assert 0.9 < norm.mean() < 1.1 and norm.std() > 0.01                 # ones, with noise
    emb = t["model.embed_tokens.weight"].float()
    assert abs(emb.mean()) < 0.002 and 0.018 < emb.std() < 0.022          # normal(0, 0.02)
    assert t["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    bias = t["model.layers.1.mlp.moe_statics.e_score_correction_bias"]
    assert bias.dtype == torch.float32 and bias.shape == (1, 8) and bias.abs().max() < 0.1
    assert torch.equal(t["model.layers.2.mlp.experts.7.down_proj.weight"],
                       random_tensor("model.layers.2.mlp.experts.7.down_proj.weight", (64, 32), torch.bfloat16, 5))


@pytest.mark.parametrize("dtype,torch_dtype", [("float16", torch.float16), ("fp32", torch.float32)])
def test_other_dtypes_keep_router_fp32(tmp_path, dtype, torch_dtype):
    path = write_random_checkpoint(preset("tiny-moe"), tmp_path / "m", dtype=dtype)
    with Checkpoint.open(path) as ck:
        assert ck.config.dtype == str(torch_dtype).replace("torch.", "")
        assert ck.validate() == []
        assert ck.ref("model.layers.1.mlp.experts.0.up_proj.weight").dtype == torch_dtype
        assert ck.ref("model.layers.1.mlp.gate.weight").dtype == torch.float32
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        write_random_checkpoint(preset("tiny"), tmp_path / "bad", dtype="int8")


def test_seed_determinism(tmp_path):
    a = write_random_checkpoint(preset("tiny"), tmp_path / "a", seed=7)
    b = write_random_checkpoint(preset("tiny"), tmp_path / "b", seed=7)
    c = write_random_checkpoint(preset("tiny"), tmp_path / "c", seed=8)
    read = lambda p: open(os.path.join(p, "model.safetensors"), "rb").read()  # noqa: E731
    assert read(a) == read(b) and read(a) != read(c)


def test_sharded_write_reads_back_identical(tmp_path):
    cfg = preset("tiny-moe")
    single = write_random_checkpoint(cfg, tmp_path / "single", seed=2)
    sharded = write_random_checkpoint(cfg, tmp_path / "sharded", seed=2, max_shard_bytes=30_000)
    files = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    with open(os.path.join(sharded, INDEX)) as f:
        index = json.load(f)
    a, b = _tensors(single), _tensors(sharded)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in a.values())
    assert set(index["weight_map"]) == set(a) and set(index["weight_map"].values()) == set(files)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    for f in files:   # every shard within the limit unless one tensor alone exceeds it
        with Checkpoint.open(sharded) as ck:
            sizes = [ck.ref(n).nbytes for n, g in index["weight_map"].items() if g == f]
        assert sum(sizes) <= 30_000 or len(sizes) == 1


def test_tensors_are_aligned_in_shards(tmp_path):
    path = write_random_checkpoint(preset("tiny-moe"), tmp_path / "m")
    with Checkpoint.open(path) as ck:
        assert all(ck.ref(n).offset % ck.ref(n).dtype.itemsize == 0 for n in ck.names)


def test_progress_counts_every_byte(tmp_path):
    seen = []
    path = write_random_checkpoint(preset("tiny-moe"), tmp_path / "m", progress=seen.append)
    with Checkpoint.open(path) as ck:
        assert sum(seen) == ck.total_bytes


# ---- atomicity -------------------------------------------------------------------------------
def test_refuses_non_empty_dir_and_overwrites_when_asked(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    write_random_checkpoint(preset("tiny"), out, seed=1)       # an empty directory is fine
    with pytest.raises(FileExistsError, match="exists and is not empty.*overwrite=True"):
        write_random_checkpoint(preset("tiny"), out, seed=2)
    write_random_checkpoint(preset("tiny-moe"), out, seed=2, overwrite=True)
    assert Checkpoint.open(out).config.is_moe
    assert sorted(os.listdir(tmp_path)) == ["m"]               # no staging or old dirs left


def test_failed_write_leaves_nothing(tmp_path):
    def boom(n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_random_checkpoint(preset("tiny"), tmp_path / "m", progress=boom)
    assert os.listdir(tmp_path) == []


def test_not_enough_disk_is_refused_up_front(tmp_path, monkeypatch):
    monkeypatch.setattr(C.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(OSError, match="GiB free"):
        write_random_checkpoint(preset("tiny"), tmp_path / "m")
    assert os.listdir(tmp_path) == []


# ---- streaming -------------------------------------------------------------------------------
@pytest.mark.slow
def test_writer_streams_large_checkpoint(tmp_path):
    # ~230 MB checkpoint; peak RSS growth must stay a fraction of it (chunks are 16 MiB of fp32)
    cfg = preset("ernie-4.5-0.3b", layers=2)
    write_random_checkpoint(cfg, tmp_path / "warm-up")     # torch's one-time set-up is not the writer's
    proc, peak, stop = psutil.Process(), [0], threading.Event()
    base = proc.memory_info().rss

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss - base)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        path = write_random_checkpoint(cfg, tmp_path / "m")
    finally:
        stop.set()
        sampler.join()
    size = os.path.getsize(os.path.join(path, "model.safetensors"))
    assert size > 200e6 and peak[0] < 64 * 2**20, (size, peak[0])
