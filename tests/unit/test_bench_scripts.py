"""The benchmark scripts run end to end at tiny sizes on the CPU and write their JSON (the
numbers themselves come from the full-size runs recorded in benchmarks/results/)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def run(script, *args, timeout=600):
    return subprocess.run([sys.executable, str(BENCH / script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def test_bench_ops_kernel_vs_reference_on_cpu(tmp_path):
    out = tmp_path / "ops.json"
    proc = run("bench_ops.py", "--device", "cpu", "--small", "--iters", "2", "--dtype", "fp32",
               "--ops", "rms_norm", "moe", "gqa_attention", "--output", out)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    from ernie_hal.backends.cpu.native import load
    cpu_moe = "cpu-grouped-experts" if load()[0] is not None else "reference"   # reference without a compiler
    assert data["device"]["backend"] == "cpu" and data["implementations"]["moe"] == cpu_moe
    ops = {r["op"] for r in data["results"]}
    assert ops == {"rms_norm", "moe", "gqa_attention"}
    for r in data["results"]:
        assert r["kernel_us"] > 0 and r["reference_us"] > 0 and r["kernel_gbps"] >= 0


def test_bench_e2e_against_transformers_on_cpu(tmp_path):
    out = tmp_path / "e2e.json"
    engines = ("ernie-hal", "ernie-hal-eager", "transformers")
    proc = run("bench_e2e.py", "--device", "cpu", "--dtype", "fp32", "--models", "tiny-moe", "--batches", 1, 2,
               "--prefill-len", 8, "--decode-len", 3, "--repeat", 1, "--checkpoints", tmp_path, "--output", out,
               "--engines", *engines)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["results"]
    assert {(r["engine"], r["batch"]) for r in rows} == {(e, b) for e in engines for b in (1, 2)}
    assert {r["decode_graphs"] for r in rows if r["engine"] == "ernie-hal-eager"} == {"off: turned off (eager)"}
    for r in rows:
        assert r["decode_tpot_ms"] > 0 and r["prefill_tokens_per_s"] > 0 and r["decode_weight_gbps"] > 0


def test_bench_generate_rounds_against_transformers(tmp_path):
    ckpt, out = tmp_path / "tiny", tmp_path / "gen.json"
    made = subprocess.run([sys.executable, "-m", "ernie_hal", "make-checkpoint", "--preset", "tiny", "--out", ckpt],
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    proc = run("bench_generate.py", "--model", ckpt, "--dtypes", "fp32", "--prefill-len", 8, "--decode-len", 4,
               "--repeat", 1, "--rounds", 2, "--output", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["rounds"] == 2 and data["memory_copy_gbps"] > 0
    assert {r["engine"] for r in data["rows"]} == {"ernie-hal", "transformers"}
    for r in data["rows"]:
        assert r["rounds"] == 2 and len(r["decode_tokens_per_s_each_round"]) == 2
        assert r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 and r["peak_rss_bytes"] > 0


def test_profile_decode_splits_a_step_by_op(tmp_path):
    out = tmp_path / "prof.json"
    proc = run("profile_decode.py", "--model", "tiny", "--dtype", "fp32", "--steps", 3, "--output", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    whats = {r["what"] for r in data["rows"]}
    assert {"linear head", "linear qkv", "swiglu_mlp", "gqa_attention"} <= whats   # fused qkv: one projection
    assert data["ms_per_step"] > 0 and all(r["ms_per_step"] >= 0 for r in data["rows"] if "rest" not in r["what"])


def test_profile_decode_names_packed_projections(tmp_path):
    out = tmp_path / "prof.json"
    proc = run("profile_decode.py", "--model", "tiny", "--dtype", "fp32", "--steps", 2, "--quantization", "wint4",
               "--group-size", 32, "--output", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    whats = {r["what"] for r in data["rows"]}
    assert data["quantization"] == "wint4" and {"linear head", "linear qkv", "linear o", "swiglu_mlp"} <= whats  # packed qkv fused too


GPU_CHECKS = BENCH.parent / "scripts" / "gpu_checks.sh"


def _gpu_checks_quick(tmp_path, *steps):
    import os
    env = dict(os.environ, QUICK="1", DEVICE="cpu", PYTHON=sys.executable, OUT=str(tmp_path / "out"),
               CKPT=str(tmp_path / "ckpt"))
    proc = subprocess.run(["bash", str(GPU_CHECKS), *steps], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{len(steps)} steps, 0 failed" in proc.stdout
    return tmp_path / "out"


def test_gpu_checks_script_fits_a_session_and_its_cheap_steps_run_on_cpu(tmp_path):
    """scripts/gpu_checks.sh is what a session with a GPU runs in one call: the one-GPU run
    (every default step) fits the 8 minutes a session can give it, and the steps that import
    little run with QUICK=1 (every step: the slow test below; each benchmark's own test runs it)."""
    limits = dict(re.findall(r"run_step ([\w-]+) (\d+) ", GPU_CHECKS.read_text()))
    assert len(limits) == 7 and sum(int(v) for k, v in limits.items() if k != "parallel") <= 8 * 60
    out = _gpu_checks_quick(tmp_path, "env", "launches")
    for name in ("devices.json", "launch_counts_cpu.json"):
        assert json.loads((out / name).read_text()), name


@pytest.mark.slow      # ~3 minutes on 2 cores; run before a session that has a GPU
def test_gpu_checks_script_runs_every_step_quick_on_cpu(tmp_path):
    """QUICK=1 on the CPU checks that every step's command line works before GPU time is spent on it."""
    _gpu_checks_quick(tmp_path, "env", "conformance", "ops", "e2e-small", "e2e-21b", "launches", "parallel")
    out = tmp_path / "out"
    for name in ("devices.json", "conformance_cpu.json", "bench_ops_cpu.json", "bench_e2e_cpu_small.json",
                 "bench_e2e_cpu_21b.json", "launch_counts_cpu.json", "bench_parallel_cpu.json",
                 "plan_300b_tp8_wint8.json"):
        assert json.loads((out / name).read_text()), name


def test_bench_structured_writes_its_json(tmp_path):
    out = tmp_path / "structured.json"
    proc = run("bench_structured.py", "--device", "cpu", "--tokens", "12", "--batches", "2", "--rounds", "1",
               "--out", out)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    row = data["decode"][0]
    assert row["batch"] == 2 and row["json_schema"]["tokens_per_sequence"] == [12]
    assert row["json_schema"]["finish_reasons"] == ["stop"] and row["free"]["tokens_per_sequence"] == [12]
    assert data["medium_schema_compile_seconds"] > data["medium_schema_cached_seconds"] >= 0
