"""benchmarks/bench_ops.py and bench_e2e.py run end to end (tiny sizes, CPU) and write their JSON;
the numbers mean something only on a GPU."""

import json
import subprocess
import sys
from pathlib import Path

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
    assert data["device"]["backend"] == "cpu" and data["implementations"]["moe"] == "reference"
    ops = {r["op"] for r in data["results"]}
    assert ops == {"rms_norm", "moe", "gqa_attention"}
    for r in data["results"]:
        assert r["kernel_us"] > 0 and r["reference_us"] > 0 and r["kernel_gbps"] >= 0


def test_bench_e2e_against_transformers_on_cpu(tmp_path):
    out = tmp_path / "e2e.json"
    proc = run("bench_e2e.py", "--device", "cpu", "--dtype", "fp32", "--models", "tiny-moe", "--batches", 1, 2,
               "--prefill-len", 8, "--decode-len", 3, "--repeat", 1, "--checkpoints", tmp_path, "--output", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["results"]
    assert {(r["engine"], r["batch"]) for r in rows} == {(e, b) for e in ("ernie-hal", "transformers") for b in (1, 2)}
    for r in rows:
        assert r["decode_tpot_ms"] > 0 and r["prefill_tokens_per_s"] > 0 and r["decode_weight_gbps"] > 0
