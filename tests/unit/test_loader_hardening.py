"""The loader and the checkpoint tools under bad files: every config field type- and
range-checked with the file and field named (NaN, Infinity, strings, lists, absurd sizes);
safetensors ranges that overlap, leave gaps or stop short of the file's end; index entries
that point outside the checkpoint; chat templates that raise (one line, exit 2 under
`generate --chat` and `chat`); `make-checkpoint --overwrite` on something that is not a
checkpoint; staging directories left by killed writers."""

import json
import os
import struct
import subprocess
import sys

import pytest

from ernie_hal.cli.main import main as cli_main
from ernie_hal.core.model.checkpoint_reader import INDEX, Checkpoint, CheckpointError, read_header
from ernie_hal.core.model.checkpoint_writer import remove_stale_staging, write_random_checkpoint
from ernie_hal.core.model.config import ConfigError, ModelConfig, preset
from ernie_hal.core.model.defaults import make_random_model

TINY = preset("tiny").to_hf_dict()


# ---- config.json --------------------------------------------------------------------------------
BAD_FIELDS = [
    # (field, value as JSON text, words)
    ("hidden_size", "Infinity", "must be an integer, found inf"),
    ("num_hidden_layers", "NaN", "must be an integer, found nan"),
    ("vocab_size", '"512"', "must be an integer, found '512'"),
    ("intermediate_size", "[128]", "must be an integer, found [128]"),
    ("num_attention_heads", "true", "must be an integer, found True"),
    ("rms_norm_eps", "NaN", "must be a finite number"),
    ("rope_theta", "-Infinity", "must be a finite number"),
    ("rms_norm_eps", '"1e-5"', "must be a finite number"),
    ("tie_word_embeddings", '"yes"', "must be true or false"),
    ("num_hidden_layers", "1000000", "above the sane limit of 1024"),
    ("hidden_size", "1e9", "above the sane limit"),
    ("max_position_embeddings", "1e300", "above the sane limit"),
    ("rms_norm_eps", "2", "must be below 1"),
    ("eos_token_id", "99999", "below vocab_size"),
    ("architectures", '"Ernie4_5ForCausalLM"', "must be a list of names"),
    ("rope_parameters", "[1, 2]", "must be an object"),
]


@pytest.mark.parametrize("field,value,words", BAD_FIELDS, ids=[f"{f}={v}" for f, v, _ in BAD_FIELDS])
def test_every_config_field_is_checked_naming_file_and_field(tmp_path, field, value, words):
    raw = json.dumps(TINY).replace(f'"{field}": {json.dumps(TINY[field])}', f'"{field}": {value}') \
        if field in TINY else json.dumps({**TINY, field: None}).replace(f'"{field}": null', f'"{field}": {value}')
    path = tmp_path / "config.json"
    path.write_text(raw)
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_file(str(path))
    msg = str(e.value)
    assert str(path) in msg and words in msg and "\n" not in msg, msg
    if field not in ("architectures", "rope_parameters"):
        assert repr(field) in msg


def test_moe_fields_are_checked_too(tmp_path):
    moe = preset("tiny-moe").to_hf_dict()
    for field, value, words in (("moe_num_experts", "NaN", "'moe_num_experts' must be an integer"),
                                ("moe_k", '"2"', "'moe_k' must be an integer"),
                                ("moe_num_experts", "100000", "above the sane limit"),
                                ("moe_layer_end_index", "7", r"moe_layer_end_index \(7\) must be -1"),
                                ("moe_norm_min", "Infinity", "'moe_norm_min' must be a finite number")):
        path = tmp_path / "config.json"
        path.write_text(json.dumps(moe).replace(f'"{field}": {json.dumps(moe[field])}', f'"{field}": {value}'))
        with pytest.raises(ConfigError, match=words):
            ModelConfig.from_file(str(path))


def test_make_checkpoint_with_a_million_layers_fails_at_once(tmp_path, capsys):
    assert cli_main(["make-checkpoint", "--preset", "tiny", "--layers", "1000000", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert "num_hidden_layers" in err and "1024" in err and "\n" not in err
    assert os.listdir(tmp_path) == []


# ---- safetensors headers ----------------------------------------------------------------------------
def write_safetensors(path, entries: dict, data_len: int, metadata=None):
    header = dict(entries)
    if metadata is not None:
        header["__metadata__"] = metadata
    js = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(js)) + js + b"\0" * data_len)


def f32(begin, end, shape):
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


@pytest.mark.parametrize("entries,data_len,words", [
    ({"a": f32(0, 16, [4]), "b": f32(8, 24, [4])}, 24, "overlaps 'a'"),                 # aliasing tensors
    ({"a": f32(0, 16, [4]), "b": f32(0, 16, [4])}, 16, "overlaps 'a'"),                 # the same bytes twice
    ({"a": f32(0, 16, [4]), "b": f32(20, 36, [4])}, 36, "gap of 4 bytes"),
    ({"a": f32(4, 20, [4])}, 20, "gap of 4 bytes"),                                     # not starting at 0
    ({"a": f32(0, 16, [4])}, 40, "24 trailing bytes"),                                  # bytes nobody owns
], ids=["overlap", "duplicate range", "gap", "late start", "trailing bytes"])
def test_safetensors_ranges_must_tile_the_data(tmp_path, entries, data_len, words):
    path = tmp_path / "x.safetensors"
    write_safetensors(path, entries, data_len)
    with pytest.raises(CheckpointError, match=words) as e:
        read_header(str(path))
    assert str(path) in str(e.value)


def test_safetensors_metadata_must_map_to_strings_and_a_good_file_passes(tmp_path):
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"a": f32(0, 16, [4])}, 16, metadata={"format": ["pt"]})
    with pytest.raises(CheckpointError, match="__metadata__"):
        read_header(str(path))
    # out of order in the header is fine: the format orders by offset, not by name
    write_safetensors(path, {"b": f32(16, 24, [2]), "a": f32(0, 16, [4])}, 24, metadata={"format": "pt"})
    refs = read_header(str(path))
    assert (refs["a"].nbytes, refs["b"].nbytes) == (16, 8)


# ---- index entries -------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors", "..", ""])
def test_index_entries_must_be_plain_file_names(tmp_path, target):
    ck = tmp_path / "ck"
    write_random_checkpoint(preset("tiny"), ck, max_shard_bytes=40_000)
    index = json.loads((ck / INDEX).read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = target
    (ck / INDEX).write_text(json.dumps(index))
    (tmp_path / "outside.safetensors").write_bytes(b"not opened")
    with pytest.raises(CheckpointError, match="expected a plain file name inside") as e:
        Checkpoint.open(ck)
    assert repr(first) in str(e.value)


def test_a_symlinked_shard_inside_the_checkpoint_still_loads(tmp_path):
    """The Hugging Face cache links each file to a blob outside the snapshot directory."""
    ck, blobs = tmp_path / "snapshot", tmp_path / "blobs"
    write_random_checkpoint(preset("tiny"), ck, max_shard_bytes=40_000)
    blobs.mkdir()
    shard = sorted(p for p in os.listdir(ck) if p.endswith(".safetensors"))[0]
    os.rename(ck / shard, blobs / "abc123")
    os.symlink(blobs / "abc123", ck / shard)
    with Checkpoint.open(ck) as c:
        assert c.validate() == []


# ---- chat templates --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def broken_template(tmp_path_factory):
    path = make_random_model(preset("tiny"), str(tmp_path_factory.mktemp("tpl") / "m"), dtype="float32")
    with open(os.path.join(path, "chat_template.jinja"), "w") as f:
        f.write("{% for m in messages %}{{ m.content }}{% endfor %}{{ (messages | length) / 0 }}")
    return path


def test_generate_chat_with_a_raising_template_is_one_line_exit_2(broken_template, capsys):
    code = cli_main(["generate", "--model", broken_template, "--device", "cpu", "--chat", "--max-new-tokens", "2",
                     "hello"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.splitlines()[-1] == "error: chat template failed: ZeroDivisionError: division by zero"
    assert "Traceback" not in err, err


def test_chat_with_a_raising_template_is_one_line_exit_2(broken_template):
    r = subprocess.run([sys.executable, "-m", "ernie_hal", "chat", "--model", broken_template, "--device", "cpu",
                        "--max-new-tokens", "2"], input="hello\n", capture_output=True, text=True, timeout=120)
    err = r.stderr.strip()
    assert r.returncode == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1] == "error: chat template failed: ZeroDivisionError: division by zero"


# ---- make-checkpoint --overwrite and staging directories ----------------------------------------
def test_overwrite_refuses_what_is_not_a_checkpoint(tmp_path, capsys):
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("years of work")
    assert cli_main(["make-checkpoint", "--preset", "tiny", "--out", str(precious), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "does not hold an ERNIE-4.5 checkpoint" in err and "nothing was deleted" in err
    assert (precious / "chapter1.tex").read_text() == "years of work"
    (precious / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')    # another model's
    assert cli_main(["make-checkpoint", "--preset", "tiny", "--out", str(precious), "--overwrite"]) == 2
    assert (precious / "chapter1.tex").exists()
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    assert cli_main(["make-checkpoint", "--preset", "tiny", "--out", str(afile), "--overwrite"]) == 2
    assert afile.read_text() == "x"
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "thesis"]


def test_overwrite_replaces_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "m"
    assert cli_main(["make-checkpoint", "--preset", "tiny", "--out", str(out), "--dtype", "fp32"]) == 0
    assert cli_main(["make-checkpoint", "--preset", "tiny-moe", "--out", str(out), "--overwrite"]) == 0
    assert Checkpoint.open(out).config.is_moe
    assert os.listdir(tmp_path) == ["m"]


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_killed_writers_staging_is_removed_by_the_next_write(tmp_path):
    stale = tmp_path / f".m.tmp-{dead_pid()}-0123456789ab"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    live = tmp_path / f".other.tmp-{os.getppid()}-0123456789ab"     # a writer that is still running
    live.mkdir()
    unrelated = tmp_path / ".hidden-user-dir"
    unrelated.mkdir()
    write_random_checkpoint(preset("tiny"), tmp_path / "m2")
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, unrelated.name, "m2"])


def test_killed_between_the_renames_the_old_checkpoint_comes_back(tmp_path):
    old = tmp_path / f".m.old-{dead_pid()}-0123456789ab"
    write_random_checkpoint(preset("tiny"), old)
    assert remove_stale_staging(str(tmp_path)) == [str(old)]
    assert os.listdir(tmp_path) == ["m"] and Checkpoint.open(tmp_path / "m").config.num_hidden_layers == 2


@pytest.mark.slow      # writes a few hundred MB; the test above covers the same path with a dead pid
def test_a_real_killed_writer_leaves_staging_that_the_next_write_removes(tmp_path):
    """SIGKILL a make-checkpoint mid-write (a checkpoint big enough to take a while), then write
    another checkpoint into the same parent."""
    import signal
    import time
    proc = subprocess.Popen([sys.executable, "-m", "ernie_hal", "make-checkpoint", "--preset", "ernie-4.5-0.3b",
                             "--layers", "4", "--dtype", "fp32", "--out", str(tmp_path / "big")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not any(".tmp-" in n for root, dirs, _ in os.walk(tmp_path) for n in dirs
                  if any(f.endswith(".safetensors") for f in os.listdir(os.path.join(root, n)))):
        assert proc.poll() is None and time.time() < deadline, "the writer finished or never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert [n for n in os.listdir(tmp_path) if ".tmp-" in n], "no staging left behind"
    assert cli_main(["make-checkpoint", "--preset", "tiny", "--out", str(tmp_path / "small")]) == 0
    assert os.listdir(tmp_path) == ["small"]
