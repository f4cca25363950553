"""`ernie-hal bench serving`: load an OpenAI-compatible server and report what SGLang's
`bench_serving` reports (same JSON keys): request, input and output token throughput; TTFT,
TPOT, ITL and end-to-end latency (mean, median, std, p90, p99, in ms); and concurrency.

Requests go to /v1/completions, streamed, with random token-id prompts (exact input lengths,
no client tokenizer), `ignore_eos` so every request yields its full output length, and
`stream_options.include_usage` so output tokens are the server's count. TTFT is the time to
the first chunk that carries a choice; ITL the gaps between later chunks (ernie-hal sends one
chunk per token). TPOT = (latency - TTFT) / (output tokens - 1), as SGLang computes it.
Arrivals are a Poisson process at --request-rate (inf: all at once), at most
--max-concurrency in flight. By default only loopback addresses are accepted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import urlparse

import httpx

from ..core.atomic import write_json


@dataclass
class RequestResult:
    prompt_len: int
    output_len: int = 0
    success: bool = False
    ttft: float = 0.0
    latency: float = 0.0
    itl: list = field(default_factory=list)
    error: str = ""


# ---- inputs -------------------------------------------------------------------------------------
def random_requests(num_prompts: int, input_len: int, output_len: int, range_ratio: float, vocab_size: int,
                    seed: int, prefix_len: int = 0) -> list:
    """[(token ids, output length)] as SGLang's random dataset draws lengths: uniform in
    [max(len * range_ratio, 1), len]. `prefix_len` tokens, the same for every request, come
    first (vLLM's --random-prefix-len: a shared system prompt)."""
    rng = random.Random(seed)
    low = min(1000, vocab_size // 2)       # keep clear of the special tokens at the bottom of a vocabulary
    prefix = [rng.randrange(low, vocab_size) for _ in range(prefix_len)]
    out = []
    for _ in range(num_prompts):
        n_in = rng.randint(max(int(input_len * range_ratio), 1), input_len)
        n_out = rng.randint(max(int(output_len * range_ratio), 1), output_len)
        out.append((prefix + [rng.randrange(low, vocab_size) for _ in range(n_in)], n_out))
    return out


def is_loopback(base_url: str) -> bool:
    host = urlparse(base_url).hostname or ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
    except OSError:
        return False


# ---- one request --------------------------------------------------------------------------------
async def send_one(client: httpx.AsyncClient, url: str, payload: dict, prompt_len: int) -> RequestResult:
    r = RequestResult(prompt_len=prompt_len)
    start = time.perf_counter()
    last = start
    chunks = 0
    try:
        async with client.stream("POST", url, json=payload) as resp:
            if resp.status_code != 200:
                r.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}"
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    r.error = obj["error"].get("message", str(obj["error"]))
                    return r
                now = time.perf_counter()
                if obj.get("choices"):
                    if chunks == 0:
                        r.ttft = now - start
                    else:
                        r.itl.append(now - last)
                    last = now
                    chunks += 1
                if obj.get("usage"):
                    r.output_len = obj["usage"].get("completion_tokens", 0)
        r.latency = time.perf_counter() - start
        r.output_len = r.output_len or chunks
        r.success = chunks > 0
        if not r.success:
            r.error = "the stream carried no token"
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
        r.error = f"{type(e).__name__}: {e}"
    return r


# ---- the run ------------------------------------------------------------------------------------
async def _arrivals(requests: list, rate: float, rng: random.Random):
    for item in requests:
        yield item
        if rate != float("inf"):
            await asyncio.sleep(rng.expovariate(rate))


async def run_benchmark(base_url: str, model: str, requests: list, request_rate: float = float("inf"),
                        max_concurrency: int | None = None, api_key: str | None = None, seed: int = 1,
                        extra_body: dict | None = None, progress: bool = True):
    """Send every request; returns (results, duration in s)."""
    url = base_url.rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = max_concurrency or len(requests)
    sem = asyncio.Semaphore(limit)
    limits = httpx.Limits(max_connections=limit + 4, max_keepalive_connections=limit + 4)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(requests), desc="requests", file=sys.stderr, disable=not sys.stderr.isatty())

    def payload(ids, n_out):
        return {"model": model, "prompt": ids, "max_tokens": n_out, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": True, **(extra_body or {})}

    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits, headers=headers) as client:
        warm = await send_one(client, url, payload(requests[0][0][:16], 4), min(16, len(requests[0][0])))
        if not warm.success:
            raise RuntimeError(f"the warm-up request to {url} failed: {warm.error}")

        async def limited(ids, n_out):
            async with sem:
                r = await send_one(client, url, payload(ids, n_out), len(ids))
            if bar is not None:
                bar.update(1)
            return r

        start = time.perf_counter()
        tasks = []
        async for ids, n_out in _arrivals(requests, request_rate, random.Random(seed)):
            tasks.append(asyncio.ensure_future(limited(ids, n_out)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return results, duration


def _stats(prefix: str, values_s: list) -> dict:
    ms = sorted(v * 1000 for v in values_s)
    if not ms:
        return {f"mean_{prefix}_ms": 0.0, f"median_{prefix}_ms": 0.0, f"std_{prefix}_ms": 0.0,
                f"p90_{prefix}_ms": 0.0, f"p99_{prefix}_ms": 0.0}
    return {f"mean_{prefix}_ms": statistics.fmean(ms), f"median_{prefix}_ms": statistics.median(ms),
            f"std_{prefix}_ms": statistics.pstdev(ms), f"p90_{prefix}_ms": _pct(ms, 90),
            f"p99_{prefix}_ms": _pct(ms, 99)}


def _pct(sorted_values: list, q: float) -> float:
    """numpy.percentile's default (linear interpolation), which SGLang uses."""
    k = (len(sorted_values) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def compute_metrics(results: list, duration: float) -> dict:
    ok = [r for r in results if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    out = {"duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
           "total_input_tokens": total_in, "total_output_tokens": total_out,
           "request_throughput": len(ok) / duration, "input_throughput": total_in / duration,
           "output_throughput": total_out / duration, "total_throughput": (total_in + total_out) / duration}
    out.update(_stats("ttft", [r.ttft for r in ok]))
    out.update(_stats("tpot", tpots))
    out.update(_stats("itl", [x for r in ok for x in r.itl]))
    out.update(_stats("e2e_latency", [r.latency for r in ok]))
    out["concurrency"] = sum(r.latency for r in ok) / duration
    out["errors"] = sorted({r.error for r in results if not r.success})[:10]
    return out


def format_report(m: dict) -> str:
    rows = [("Backend:", m["backend"]), ("Traffic request rate:", m["request_rate"]),
            ("Max request concurrency:", m["max_concurrency"] or "not set"),
            ("Successful requests:", m["completed"]), ("Failed requests:", m["failed"]),
            ("Benchmark duration (s):", f"{m['duration']:.2f}"),
            ("Total input tokens:", m["total_input_tokens"]), ("Total generated tokens:", m["total_output_tokens"]),
            ("Request throughput (req/s):", f"{m['request_throughput']:.2f}"),
            ("Input token throughput (tok/s):", f"{m['input_throughput']:.2f}"),
            ("Output token throughput (tok/s):", f"{m['output_throughput']:.2f}"),
            ("Total token throughput (tok/s):", f"{m['total_throughput']:.2f}"),
            ("Concurrency:", f"{m['concurrency']:.2f}")]
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]
    lines += [f"{k:<40} {v:<10}" for k, v in rows]
    for title, key in (("End-to-End Latency", "e2e_latency"), ("Time to First Token", "ttft"),
                       ("Time per Output Token (excl. 1st token)", "tpot"), ("Inter-token Latency", "itl")):
        label = {"e2e_latency": "E2E Latency"}.get(key, key.upper())
        lines.append("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        for stat, name in (("mean", "Mean"), ("median", "Median"), ("p99", "P99")):
            lines.append(f"{name + ' ' + label + ' (ms):':<40} {m[stat + '_' + key + '_ms']:<10.2f}")
    lines.append("=" * 50)
    return "\n".join(lines)


def save_json(path: str, obj) -> None:
    write_json(path, obj)


def served_model(base_url: str, api_key: str | None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]


def bench_serving(base_url: str, model: str | None = None, dataset: str = "random", num_prompts: int = 100,
                  random_input_len: int = 1024, random_output_len: int = 1024, random_range_ratio: float = 0.0,
                  random_prefix_len: int = 0,
                  request_rate: float = float("inf"), max_concurrency: int | None = None, seed: int = 1,
                  api_key: str | None = None, vocab_size: int | None = None, allow_remote: bool = False,
                  progress: bool = True) -> dict:
    """Run one benchmark and return its report (SGLang's bench_serving keys)."""
    if dataset != "random":
        raise ValueError(f"dataset {dataset!r} is not supported; use --dataset random")
    if not allow_remote and not is_loopback(base_url):
        raise ValueError(f"{base_url} is not a loopback address; pass --allow-remote to load another machine")
    card = served_model(base_url, api_key)
    model = model or card["id"]
    vocab = vocab_size or card.get("vocab_size") or 32000
    requests = random_requests(num_prompts, random_input_len, random_output_len, random_range_ratio, vocab, seed,
                               random_prefix_len)
    results, duration = asyncio.run(run_benchmark(base_url, model, requests, request_rate, max_concurrency,
                                                  api_key, seed, progress=progress))
    report = {"backend": "ernie-hal", "base_url": base_url, "model": model, "dataset_name": dataset,
              "request_rate": request_rate if request_rate != float("inf") else "inf",
              "max_concurrency": max_concurrency, "num_prompts": num_prompts,
              "random_input_len": random_input_len, "random_output_len": random_output_len,
              "random_range_ratio": random_range_ratio, "random_prefix_len": random_prefix_len, "seed": seed,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    report.update(compute_metrics(results, duration))
    return report
