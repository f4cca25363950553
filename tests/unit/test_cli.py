"""The CLI as a user runs it (subprocess): devices, generate, make-checkpoint, bad input."""

import json
import re


def test_devices_json_lists_every_builtin_with_reason_or_smoke_test(cli):
    out = cli(["devices", "--json"])
    assert out.returncode == 0, out.stderr
    rows = {r["backend"]: r for r in json.loads(out.stdout)}
    assert {"cpu", "cuda", "rocm", "ixuca"} <= set(rows)
    for r in rows.values():
        assert {"backend", "available", "reason", "device", "arch", "memory_bytes"} <= set(r)
        assert r["available"] or r["reason"]
    assert rows["cpu"]["smoke_test"] == "PASS" and rows["cpu"]["memory_bytes"] > 0
    caps = rows["cpu"]["capabilities"]
    assert caps["graphs"] is False and caps["unified_memory"] is True and "bfloat16" in caps["dtypes"]


def test_devices_table(cli):
    out = cli(["devices"])
    assert out.returncode == 0 and "cpu" in out.stdout and "PASS" in out.stdout


def test_generate_json_on_the_embedded_default(cli):
    out = cli(["generate", "Hello", "--device", "cpu", "--max-new-tokens", "8", "--temperature", "0",
                   "--json"])
    assert out.returncode == 0, out.stderr
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(last["token_ids"]) <= 8 and isinstance(last["text"], str)
    assert last["random_weights"] is True
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "rss_before_load_bytes", "peak_rss_bytes"):
        assert key in last["metrics"]


def test_generate_streams_text_and_reports_speed(cli):
    out = cli(["generate", "Hi", "--device", "cpu", "--max-new-tokens", "6", "--seed", "1", "--chat"])
    assert out.returncode == 0, out.stderr
    assert "random weights" in out.stderr and "tokens/s" in out.stderr


def test_missing_device_fails_loudly_with_reason(cli):
    out = cli(["generate", "Hi", "--device", "rocm"])
    assert out.returncode != 0
    assert "rocm is not available" in out.stderr or "rocm" in out.stderr


def test_bad_model_path_names_the_problem(cli, tmp_path):
    out = cli(["generate", "Hi", "--model", str(tmp_path / "nope")])
    assert out.returncode == 2 and "neither a checkpoint directory nor a preset" in out.stderr


def test_make_checkpoint_then_generate(cli, tmp_path):
    dest = tmp_path / "ckpt"
    out = cli(["make-checkpoint", "--preset", "tiny", "--out", str(dest), "--seed", "3"])
    assert out.returncode == 0, out.stderr
    assert (dest / "config.json").exists()
    again = cli(["make-checkpoint", "--preset", "tiny", "--out", str(dest)])
    assert again.returncode == 2 and "not empty" in again.stderr
    gen = cli(["generate", "x", "--model", str(dest), "--device", "cpu", "--max-new-tokens", "3",
                   "--temperature", "0", "--json"])
    assert gen.returncode == 0, gen.stderr


def test_chat_keeps_the_conversation_and_reuses_earlier_turns(cli):
    turns = "hello there\nhow are you\n/reset\nhello there\n/exit\n"
    out = cli(["chat", "--device", "cpu", "--max-new-tokens", "6", "--temperature", "0"], input=turns)
    assert out.returncode == 0, out.stderr
    replies = out.stdout.splitlines()
    assert len(replies) == 3 and replies[0] == replies[2]        # after /reset: the same first turn
    computed, reused = (int(w) for w in re.findall(r"(\d+) computed, (\d+) reused", out.stderr)[0])
    assert reused > 0 and computed > 0
