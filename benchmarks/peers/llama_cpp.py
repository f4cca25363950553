"""llama.cpp as a peer: find or build its CPU tools from the `llama-cpp-python` source package,
convert an ernie-hal / -PT checkpoint with llama.cpp's own `convert_hf_to_gguf.py`, quantize it
with `llama-quantize`, and run `llama-bench` and `llama-server` on it.

Builds and GGUF files live in a cache outside the repository (ERNIE_HAL_PEERS_CACHE, default
~/.cache/ernie-hal-peers); LLAMA_CPP_DIR points at an existing source tree with build/bin instead.
The converter needs a sentencepiece `tokenizer.model` beside the weights; random checkpoints have
none, so one with the real vocabulary size is synthesized (byte pieces, ERNIE's special tokens,
filler pieces) into a side directory of symlinks — the weights read are the checkpoint's own.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass

CACHE = os.environ.get("ERNIE_HAL_PEERS_CACHE", os.path.expanduser("~/.cache/ernie-hal-peers"))
TOOLS = ("llama-bench", "llama-server", "llama-quantize")
# GGUF file types by the name llama.cpp prints; which come straight from the converter
CONVERTER_TYPES = {"F32": "f32", "BF16": "bf16", "F16": "f16", "Q8_0": "q8_0"}
QUANTIZED_FROM = {"Q4_0": "BF16", "Q4_K_M": "BF16"}   # llama-quantize input for the rest


class PeerError(RuntimeError):
    """llama.cpp could not be found, built, converted or run; the message says which step."""


@dataclass(frozen=True)
class LlamaCpp:
    src: str        # the llama.cpp source tree (convert_hf_to_gguf.py, gguf-py/)
    bin: str        # the folder with llama-bench, llama-server, llama-quantize

    def exe(self, name: str) -> str:
        return os.path.join(self.bin, name)

    @property
    def version(self) -> str:
        try:
            out = subprocess.run([self.exe("llama-bench"), "--version"], capture_output=True, text=True, timeout=30)
            return (out.stdout + out.stderr).strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            return "unknown"


def _has_tools(bindir: str) -> bool:
    return all(os.access(os.path.join(bindir, t), os.X_OK) for t in TOOLS)


def find(cache: str = CACHE) -> LlamaCpp | None:
    """An existing build: LLAMA_CPP_DIR, else any build in the cache."""
    roots = [os.environ["LLAMA_CPP_DIR"]] if os.environ.get("LLAMA_CPP_DIR") else []
    roots += sorted(glob.glob(os.path.join(cache, "*", "vendor", "llama.cpp")), reverse=True)
    for root in roots:
        bindir = os.path.join(root, "build", "bin")
        if _has_tools(bindir) and os.path.isfile(os.path.join(root, "convert_hf_to_gguf.py")):
            return LlamaCpp(src=root, bin=bindir)
    return None


# /proc/cpuinfo flag -> ggml's cmake option, for a build without -march=native
_GGML_ISA = {"sse4_2": "GGML_SSE42", "avx": "GGML_AVX", "avx2": "GGML_AVX2", "bmi2": "GGML_BMI2", "fma": "GGML_FMA",
             "f16c": "GGML_F16C", "avx_vnni": "GGML_AVX_VNNI", "avx512f": "GGML_AVX512",
             "avx512vbmi": "GGML_AVX512_VBMI", "avx512_vnni": "GGML_AVX512_VNNI", "avx512_bf16": "GGML_AVX512_BF16"}


def isa_options(cpuinfo: str = "/proc/cpuinfo") -> list:
    """cmake options for the CPU build: -march=native, except where the CPU advertises AMX. A VM
    can list amx_tile without the kernel granting its tile state; the native build then compiles
    ggml's AMX kernels for Q8_0/Q4_0 and llama-bench dies (SIGILL / SIGSEGV, seen here). Then the
    build names every other extension the CPU has and leaves AMX out."""
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    if "amx_tile" not in flags:
        return ["-DGGML_NATIVE=ON"]
    return ["-DGGML_NATIVE=OFF", *(f"-D{opt}={'ON' if flag in flags else 'OFF'}" for flag, opt in _GGML_ISA.items()),
            "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]


def build(cache: str = CACHE, jobs: int | None = None, log=sys.stderr) -> LlamaCpp:
    """Download the llama-cpp-python sdist (its vendor/llama.cpp is llama.cpp's source) and
    build the CPU tools with cmake + ninja (about 10 minutes on 2 cores)."""
    os.makedirs(os.path.join(cache, "src"), exist_ok=True)
    print("llama.cpp: downloading the llama-cpp-python source package", file=log, flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    "llama-cpp-python", "-d", os.path.join(cache, "src")], check=True)
    sdists = sorted(glob.glob(os.path.join(cache, "src", "llama_cpp_python-*.tar.gz")))
    if not sdists:
        raise PeerError("pip download of llama-cpp-python gave no source archive")
    with tarfile.open(sdists[-1]) as tar:
        tar.extractall(cache, filter="data")
    root = os.path.join(cache, os.path.basename(sdists[-1])[: -len(".tar.gz")], "vendor", "llama.cpp")
    for tool in ("cmake", "ninja"):
        if not shutil.which(tool):
            raise PeerError(f"building llama.cpp needs {tool}; install it (apt-get install cmake ninja-build)")
    print(f"llama.cpp: building {', '.join(TOOLS)} in {root}/build", file=log, flush=True)
    subprocess.run(["cmake", "-S", root, "-B", os.path.join(root, "build"), "-G", "Ninja",
                    "-DCMAKE_BUILD_TYPE=Release", *isa_options(), "-DLLAMA_CURL=OFF",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", os.path.join(root, "build"), "-j", str(jobs or os.cpu_count() or 2),
                    "--target", *TOOLS], check=True, stdout=subprocess.DEVNULL)
    found = find(cache)
    if found is None:
        raise PeerError(f"llama.cpp built in {root} but {', '.join(TOOLS)} are missing from build/bin")
    return found


def find_or_build(cache: str = CACHE, allow_build: bool = True) -> LlamaCpp:
    found = find(cache)
    if found:
        return found
    if not allow_build:
        raise PeerError(f"no llama.cpp build in {cache} (and LLAMA_CPP_DIR unset); run without --no-build")
    return build(cache)


# ---- a sentencepiece tokenizer.model with the checkpoint's vocabulary size ----------------------
ERNIE_SPECIALS = {0: "<unk>", 1: "<s>", 2: "</s>"}
ERNIE_ADDED = ["<|begin_of_sentence|>", "<|end_of_sentence|>", "<mask:1>"]


def write_sentencepiece_model(path: str, vocab_size: int) -> None:
    """A valid BPE sentencepiece model of exactly `vocab_size` pieces: <unk> <s> </s>, the 256
    byte pieces (any text tokenizes through byte fallback), ERNIE's added specials near the top,
    and distinct filler pieces. Only sizes matter for speed; the ids are the checkpoint's."""
    from sentencepiece import sentencepiece_model_pb2 as sp

    m = sp.ModelProto()
    m.trainer_spec.model_type = sp.TrainerSpec.BPE
    m.trainer_spec.vocab_size = vocab_size
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id = 0, 1, 2, -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = False      # as ERNIE's tokenizer config (no prefix space)
    T = sp.ModelProto.SentencePiece.Type
    pieces = [(ERNIE_SPECIALS[i], 0.0, T.UNKNOWN if i == 0 else T.CONTROL) for i in range(3)]
    pieces += [(f"<0x{b:02X}>", 0.0, T.BYTE) for b in range(256)]
    added = [(p, 0.0, T.USER_DEFINED) for p in ERNIE_ADDED]
    filler = vocab_size - len(pieces) - len(added)
    if filler < 0:
        raise PeerError(f"vocabulary of {vocab_size} is too small for a sentencepiece model")
    # "\u2581" (sentencepiece's escaped space) first, so spaces decode back to spaces
    pieces += [("\u2581", 0.0, T.NORMAL)] + [(f"\u2581t{i}", -float(i + 1), T.NORMAL) for i in range(filler - 1)]
    pieces += added
    for text, score, kind in pieces:
        p = m.pieces.add()
        p.piece, p.score, p.type = text, score, kind
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(m.SerializeToString())
    os.replace(tmp, path)


def converter_dir(checkpoint: str, workdir: str) -> str:
    """`workdir` holding symlinks to the checkpoint's files plus a synthesized tokenizer.model
    when the checkpoint has none (the converter reads the vocabulary from it)."""
    os.makedirs(workdir, exist_ok=True)
    for name in os.listdir(checkpoint):
        if name.startswith("tokenizer"):
            continue
        dst = os.path.join(workdir, name)
        if not os.path.lexists(dst):
            os.symlink(os.path.abspath(os.path.join(checkpoint, name)), dst)
    real = os.path.join(checkpoint, "tokenizer.model")
    tok = os.path.join(workdir, "tokenizer.model")
    if os.path.isfile(real):
        if not os.path.lexists(tok):
            os.symlink(os.path.abspath(real), tok)
    elif not os.path.isfile(tok):
        with open(os.path.join(checkpoint, "config.json")) as f:
            vocab = json.load(f)["vocab_size"]
        write_sentencepiece_model(tok, vocab)
    with open(os.path.join(workdir, "tokenizer_config.json"), "w") as f:
        json.dump({"add_prefix_space": False, "add_bos_token": False, "add_eos_token": False,
                   "tokenizer_class": "Ernie4_5Tokenizer"}, f)
    return workdir


def _fingerprint(checkpoint: str) -> str:
    """Names, sizes and the first and last MiB of every file: a checkpoint with other weights gets
    new GGUFs, while one rewritten with the same seed (same bytes) finds its old ones."""
    h = hashlib.sha1()
    for name in sorted(os.listdir(checkpoint)):
        path = os.path.join(checkpoint, name)
        size = os.path.getsize(path)
        h.update(f"{name}:{size};".encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    return h.hexdigest()[:12]


def gguf_for(llama: LlamaCpp, checkpoint: str, ftype: str, cache: str = CACHE, log=sys.stderr,
             via: str | None = None) -> str:
    """The checkpoint as a GGUF of `ftype` (F32, BF16, F16, Q8_0, Q4_0, ...), converted once and
    cached by the checkpoint's fingerprint. `via` names the GGUF llama-quantize starts from
    (default BF16); via="Q8_0" needs half the disk of BF16 for a model that barely fits (the
    intermediate is deleted afterwards; requantizing rounds twice, which changes no speed)."""
    ftype = ftype.upper()
    base = os.path.join(cache, "gguf", f"{os.path.basename(os.path.abspath(checkpoint))}-{_fingerprint(checkpoint)}")
    out = os.path.join(base, f"model-{ftype}.gguf")
    if os.path.isfile(out):
        return out
    os.makedirs(base, exist_ok=True)
    tmp = out + ".partial"
    if ftype in CONVERTER_TYPES:
        src = converter_dir(checkpoint, os.path.join(base, "hf"))
        env = dict(os.environ, PYTHONPATH=os.path.join(llama.src, "gguf-py") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        print(f"llama.cpp: converting {checkpoint} to {ftype}", file=log, flush=True)
        r = subprocess.run([sys.executable, os.path.join(llama.src, "convert_hf_to_gguf.py"), src,
                            "--outtype", CONVERTER_TYPES[ftype], "--outfile", tmp],
                           capture_output=True, text=True, env=env)
        if r.returncode:
            raise PeerError(f"convert_hf_to_gguf.py failed ({ftype}):\n{r.stderr[-3000:]}")
    elif ftype in QUANTIZED_FROM:
        start = (via or QUANTIZED_FROM[ftype]).upper()
        src = gguf_for(llama, checkpoint, start, cache, log)
        print(f"llama.cpp: quantizing {start} to {ftype}", file=log, flush=True)
        requant = ["--allow-requantize"] if start not in ("F32", "BF16", "F16") else []
        r = subprocess.run([llama.exe("llama-quantize"), *requant, src, tmp, ftype], capture_output=True, text=True)
        if r.returncode:
            raise PeerError(f"llama-quantize {ftype} failed:\n{r.stderr[-3000:]}")
        if via:
            os.unlink(src)
    else:
        raise PeerError(f"unknown GGUF type {ftype}; use one of {', '.join([*CONVERTER_TYPES, *QUANTIZED_FROM])}")
    os.replace(tmp, out)
    return out


# ---- running: peak RSS of one child, llama-bench, llama-server ----------------------------------
def run_measured(cmd: list, timeout: float | None = None, env: dict | None = None) -> tuple:
    """(returncode, stdout, stderr, peak RSS bytes) of one command, from the kernel's own
    accounting of that child (wait4), so no sampling misses a peak."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, text=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.monotonic() > deadline:
                p.kill()
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.05)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return p.returncode, out.read(), err.read(), ru.ru_maxrss * 1024


def bench(llama: LlamaCpp, gguf: str, threads: int, prompts: list, n_gen: int, repetitions: int) -> dict:
    """llama-bench's pp<N> and tg<n_gen> rows (tokens/s, mean and per repetition) and its peak RSS."""
    cmd = [llama.exe("llama-bench"), "-m", gguf, "-t", str(threads), "-r", str(repetitions), "-o", "json",
           "-p", ",".join(str(p) for p in prompts) if prompts else "0", "-n", str(n_gen)]
    rc, out, err, rss = run_measured(cmd, timeout=3600)
    if rc:
        raise PeerError(f"llama-bench failed ({rc}):\n{err[-2000:]}")
    rows = json.loads(out)
    result = {"peak_rss_bytes": rss, "build": rows[0].get("build_commit") if rows else None}
    for row in rows:
        key = f"pp{row['n_prompt']}" if row.get("n_prompt") else f"tg{row['n_gen']}"
        result[key] = {"tokens_per_s": row["avg_ts"], "samples_tokens_per_s": row.get("samples_ts", [])}
    return result


@contextmanager
def server(llama: LlamaCpp, gguf: str, port: int, threads: int, parallel: int, ctx_per_seq: int,
           startup_timeout: float = 300):
    """llama-server on 127.0.0.1:port with `parallel` slots of ctx_per_seq tokens each; yields
    its base URL once /health answers, and stops it afterwards."""
    cmd = [llama.exe("llama-server"), "-m", gguf, "--host", "127.0.0.1", "--port", str(port),
           "-t", str(threads), "-np", str(parallel), "-c", str(ctx_per_seq * parallel), "--no-webui"]
    log = tempfile.TemporaryFile("w+")
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if p.poll() is not None:
                log.seek(0)
                raise PeerError(f"llama-server exited ({p.returncode}):\n{log.read()[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise PeerError(f"llama-server did not answer /health within {startup_timeout:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        p.terminate()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        log.close()
