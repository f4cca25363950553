"""The llama.cpp peer tooling (benchmarks/peers/llama_cpp.py) without llama.cpp itself: the
synthesized sentencepiece model its converter needs, the converter's side directory, the
per-child peak-RSS measurement, and the ernie-hal side of bench_vs_llamacpp.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
from peers import llama_cpp as L  # noqa: E402


def test_sentencepiece_model_has_the_real_vocabulary_size_and_round_trips_any_text(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    path = tmp_path / "tokenizer.model"
    L.write_sentencepiece_model(str(path), 103424)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert sp.get_piece_size() == 103424
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    assert sp.piece_to_id("<|end_of_sentence|>") != sp.unk_id()
    text = "Grüße, 世界! \n\t"
    assert sp.decode(sp.encode(text)) == text           # byte fallback covers every character


def test_converter_dir_links_the_weights_and_adds_a_tokenizer(tmp_path):
    pytest.importorskip("google.protobuf")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"vocab_size": 1024}))
    (ckpt / "model.safetensors").write_bytes(b"weights")
    (ckpt / "tokenizer_config.json").write_text("{}")
    side = Path(L.converter_dir(str(ckpt), str(tmp_path / "side")))
    assert os.path.realpath(side / "model.safetensors") == str((ckpt / "model.safetensors").resolve())
    assert (side / "tokenizer.model").stat().st_size > 0
    assert json.loads((side / "tokenizer_config.json").read_text())["add_prefix_space"] is False
    before = L._fingerprint(str(ckpt))
    (ckpt / "model.safetensors").write_bytes(b"other weights")
    assert L._fingerprint(str(ckpt)) != before           # a changed checkpoint gets new GGUFs


def test_run_measured_reports_the_childs_own_peak_rss():
    code = "import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('ok')"
    rc, out, err, rss = L.run_measured([sys.executable, "-c", code], timeout=60)
    assert rc == 0 and out.strip() == "ok"
    assert rss >= 300 * 2**20
    rc, _, _, _ = L.run_measured([sys.executable, "-c", "raise SystemExit(3)"], timeout=60)
    assert rc == 3


def test_unknown_gguf_type_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(L.PeerError, match="unknown GGUF type Q3_X"):
        L.gguf_for(L.LlamaCpp(src=str(tmp_path), bin=str(tmp_path)), str(tmp_path), "q3_x", cache=str(tmp_path))


def test_the_ernie_hal_side_of_the_comparison_runs_on_a_tiny_model(tmp_path):
    ckpt = tmp_path / "tiny"
    made = subprocess.run([sys.executable, "-m", "ernie_hal", "make-checkpoint", "--preset", "tiny", "--out", ckpt],
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    proc = subprocess.run([sys.executable, str(BENCH / "bench_vs_llamacpp.py"), "--child", "ernie-hal",
                           "--precision", "fp32", "--model", str(ckpt), "--threads", "1", "--decode-len", "4",
                           "--repetitions", "2", "--prefill", "8", "16"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads([x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1][7:])
    assert len(r["decode"]) == 2 and all(t > 0 for t in r["decode"]) and r["first_decode_tokens_per_s"] > 0
    assert len(r["pp8"]) == 2 and len(r["pp16"]) == 2 and r["weight_bytes_per_token"] > 0


def test_the_peer_build_is_native_unless_the_cpu_advertises_amx(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f\n")
    assert L.isa_options(str(plain)) == ["-DGGML_NATIVE=ON"]
    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nflags\t\t: sse4_2 avx avx2 bmi2 fma f16c avx512f avx512_vnni amx_tile amx_int8\n")
    opts = L.isa_options(str(amx))
    assert "-DGGML_NATIVE=OFF" in opts and "-DGGML_AMX_INT8=OFF" in opts
    assert "-DGGML_AVX512=ON" in opts and "-DGGML_AVX512_VNNI=ON" in opts and "-DGGML_AVX512_BF16=OFF" in opts
