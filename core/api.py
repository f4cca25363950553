"""The Python API: devices(), pick_device(), load() and the Model it returns."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import psutil
import torch

from .model import defaults
from .rss import peak_rss_bytes  # noqa: F401 - part of the API (benchmarks, tests)
from .plugins.backend import Backend
from .runtime.engine import Engine
from .model.graph import build
from .plugins.kernel_table import OpSpec
from .runtime.executor import ErnieModel, ResidentWeights
from .memory.placement import DEVICE, HOST, BudgetError, MODES, OFFLOAD_ALIASES, parse_budget
from .memory.placement import plan as plan_placement
from .memory.requantize import refuse_streaming_requantized
from .plugins.registry import get_registry
from .runtime.sampling import SamplingParams
from .model.checkpoint_reader import Checkpoint
from .quant import checkpoint as qckpt
from .quant import QuantError, with_int8_activations

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "half": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def devices(smoke_test: bool = True) -> list:
    """Every registered backend and device: availability, reason, facts, and a tiny-op check."""
    from .plugins.device_smoke import describe_all
    return describe_all(get_registry(), smoke_test=smoke_test)


def pick_device(device: str = "auto", min_memory: int = 0) -> Backend:
    """The Backend for `device` ("auto", "cpu", "cuda:1", "rocm", ...). Explicit requests that
    cannot be met raise DeviceError with the probe's reason; only "auto" falls back."""
    return get_registry().pick(device, min_memory=min_memory)


def resolve_dtype(dtype, backend: Backend, config) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        chosen = dtype
    elif dtype in (None, "auto"):
        wanted = getattr(torch, config.dtype)
        chosen = next((d for d in (wanted, torch.float16, torch.float32) if d in backend.caps.dtypes))
    elif str(dtype).lower() in DTYPES:
        chosen = DTYPES[str(dtype).lower()]
    else:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, bf16, fp16 or fp32")
    if chosen not in backend.caps.dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in backend.caps.dtypes)
        raise ValueError(f"{backend.info.label} ({backend.info.name}) does not support {chosen}; it supports {names}")
    return chosen


def resolve_model_path(path_or_preset: str | None, progress=None) -> tuple:
    """(directory, is_random_weights). None = the embedded default model."""
    if path_or_preset is None:
        return defaults.random_model_path(defaults.DEFAULT_PRESET, progress=progress), True
    if os.path.isdir(path_or_preset):
        return path_or_preset, _is_random(path_or_preset)
    if defaults.is_preset(path_or_preset):
        return defaults.random_model_path(path_or_preset.lower(), progress=progress), True
    raise FileNotFoundError(
        f"{path_or_preset!r} is neither a checkpoint directory nor a preset "
        f"({', '.join(sorted(defaults.PRESETS))}); download an ERNIE-4.5 -PT checkpoint or make one "
        f"with `ernie-hal make-checkpoint`")


def _is_random(path: str) -> bool:
    return os.path.exists(os.path.join(path, "ernie_hal_tokenizer.json"))


def _load_tokenizer(path):
    """The checkpoint's tokenizer, or None when it has no tokenizer files at all: a directory of
    weights only still serves token ids. Malformed tokenizer files are an error."""
    from .model.tokenizer import NoTokenizerError, load_tokenizer
    try:
        return load_tokenizer(path)
    except NoTokenizerError:
        return None


@dataclass
class Completion:
    text: str
    token_ids: list
    prompt_token_ids: list
    finish_reason: str
    metrics: dict = field(default_factory=dict)
    logprobs: list | None = None     # [(log p(token), [(id, log p)] top alternatives)] when asked for
    prompt_logprobs: list | None = None   # the same for prompt tokens 1.. (token 0 has no context)


class Model:
    """A loaded model: `generate` for text, `logits` for parity checks."""

    def __init__(self, path, config, backend, dtype, model: ErnieModel, tokenizer, random_weights,
                 rss_before_load, plan=None, eager: bool = False, prefix_caching: bool = False):
        self.path, self.config, self.backend, self.dtype = path, config, backend, dtype
        self.model, self.tokenizer, self.random_weights = model, tokenizer, random_weights
        self.rss_before_load = rss_before_load
        self.plan = plan              # placement.Plan: where every weight lives
        self.parallel = None          # tensor parallel: the layout (what each rank holds), as data
        self.group = None             # tensor parallel: this process's parallel.group.RankGroup
        self.eager = eager            # True: no decode graphs, every step launched op by op
        self.engine = Engine(model, stop_token_ids=tokenizer.stop_token_ids if tokenizer else (),
                             graphs=not eager, prefix_caching=prefix_caching)
        self._grammars = None

    @property
    def grammars(self):
        """The grammar compiler of this model (its vocabulary handed to xgrammar once, on first use)."""
        if self._grammars is None:
            if self.tokenizer is None:
                raise ValueError(f"{self.path} has no tokenizer; structured output needs one")
            from .runtime.grammar import Grammars
            self._grammars = Grammars(self.tokenizer, self.config.vocab_size, self.engine.stop_token_ids)
        return self._grammars

    def grammar_spec(self, json_schema=None, grammar=None):
        """The GrammarSpec of a generate call: a JSON Schema (dict, JSON text or a pydantic model
        class) or a GrammarSpec; None for free text. GrammarError when it does not compile."""
        if json_schema is not None and grammar is not None:
            raise ValueError("give json_schema or grammar, not both")
        from .runtime.grammar import GrammarSpec
        if json_schema is not None:
            if hasattr(json_schema, "model_json_schema"):
                json_schema = json_schema.model_json_schema()
            grammar = GrammarSpec.json_schema(json_schema)
        if grammar is not None:
            self.grammars.compile(grammar)      # fail here, before any forward
        return grammar

    @property
    def quantization(self) -> dict:
        """Which weight-only scheme the weights are in and the bytes they hold: {"scheme": "wint4"
        | "none", "group_size": 128 | None, "weight_bytes": packed + plain weight bytes}."""
        g = self.model.graph
        q = g.quant
        return {"scheme": q.scheme if q else "none", "group_size": q.group_size if q else None,
                "weight_bytes": sum(w.stored_nbytes(self.dtype) for w in g.weights())}

    def describe(self) -> str:
        """The load line's tail: dtype, quantization and weight bytes."""
        q = self.quantization
        scheme = "" if q["scheme"] == "none" else f", {self.model.graph.quant.label}"
        return (f"{str(self.dtype).replace('torch.', '')}{scheme}, weights {q['weight_bytes'] / 2**20:.0f} MiB")

    @property
    def kernels(self) -> dict:
        """op -> implementation bound at load."""
        return self.model.kernels.describe()

    def encode(self, prompt, chat: bool = False) -> list:
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        if self.tokenizer is None:
            raise ValueError(f"{self.path} has no tokenizer; pass token ids instead of text")
        if chat:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    def generate(self, prompts, max_new_tokens: int = 128, temperature: float = 0.8, top_p: float = 0.8,
                 top_k: int = 0, min_p: float = 0.0, seed: int | None = None, chat: bool = False, stop_token_ids=(),
                 ignore_eos: bool = False, on_token=None, presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0, repetition_penalty: float = 1.0, logprobs: int | None = None,
                 prompt_logprobs: int | None = None, json_schema=None, grammar=None):
        """Text, token ids, or (with chat=True) a conversation as a list of {"role", "content"}
        messages in; Completion(s) out: one for a single prompt, a list for a list of them.
        temperature=0 is greedy; min_p drops tokens less likely than min_p x the most likely.
        on_token(index, token_id) is called as tokens are produced.
        Penalties: presence and frequency (OpenAI's, on generated tokens), repetition (Hugging
        Face's, on prompt and generated tokens); they apply to greedy decoding too. `logprobs=k`
        adds each token's log-probability under the model (before penalties and temperature) and
        its k most likely alternatives; `prompt_logprobs=k` the same for the prompt's tokens (each
        scored by the positions before it: what evaluation harnesses call loglikelihood).
        `json_schema` (a dict, JSON text or pydantic model class) or `grammar` (a GrammarSpec of
        core/runtime/grammar.py) constrains every output to it; finish_reason "length" means it
        was cut before the structure closed."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and (
            all(isinstance(t, int) for t in prompts) or all(isinstance(m, dict) for m in prompts)))
        batch = [prompts] if single else list(prompts)
        ids = [self.encode(p, chat=chat) for p in batch]
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, min_p=min_p, seed=seed, stop_token_ids=tuple(stop_token_ids),
                                ignore_eos=ignore_eos, presence_penalty=presence_penalty,
                                frequency_penalty=frequency_penalty, repetition_penalty=repetition_penalty,
                                logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        spec = self.grammar_spec(json_schema, grammar)
        seqs, times = self.engine.generate(ids, params, on_token=on_token,
                                           grammar=None if spec is None else lambda: self.grammars.state(spec))
        metrics = times.as_dict()
        metrics.update(rss_before_load_bytes=self.rss_before_load, peak_rss_bytes=peak_rss_bytes(),
                       decode_graphs=self.engine.decode_graphs,
                       decode_graph_eager_steps=self.engine.graph_metrics()["decode_graph_eager_steps"],
                       quantization=self.quantization)
        offload = self.offload_stats()
        if offload is not None:
            metrics["offload"] = offload
        out = [Completion(text=self.decode(s.output_ids), token_ids=list(s.output_ids),
                          prompt_token_ids=list(s.prompt_ids), finish_reason=s.finish_reason,
                          metrics=metrics, logprobs=list(s.logprobs) if logprobs is not None else None,
                          prompt_logprobs=list(s.prompt_logprobs) if prompt_logprobs is not None else None)
               for s in seqs]
        return out[0] if single else out

    def offload_stats(self) -> dict | None:
        """Bytes moved, cache hits and where the time went, when weights are staged; else None."""
        stats = getattr(self.model.weights, "stats", None)
        return stats() if stats is not None else None

    def close(self) -> None:
        """Stop the staging thread (offloaded models); the model is unusable afterwards."""
        close = getattr(self.model.weights, "close", None)
        if close is not None:
            close()
        if self.group is not None:    # the other ranks leave, then the process group ends
            self.group.close()

    def decode(self, token_ids) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True) if self.tokenizer else ""

    @torch.inference_mode()
    def logits(self, token_ids) -> torch.Tensor:
        """float32 logits [T, vocab] for every position of one sequence (prefill, causal)."""
        ids = [int(t) for t in token_ids]
        seq = self.engine.new_sequence(ids, SamplingParams(max_new_tokens=1, temperature=0))
        kv = self.engine.ensure_kv(self.engine.blocks_for(len(ids)))
        kv.add_sequence(seq.seq_id)
        try:
            meta = kv.prepare([seq.seq_id], [len(ids)])
            dev = self.backend.device
            return self.model.forward(torch.tensor(ids, dtype=torch.long, device=dev), meta, kv).cpu()
        finally:
            kv.free_sequence(seq.seq_id)

    def __repr__(self) -> str:
        kind = " (random weights)" if self.random_weights else ""
        return f"<ernie_hal.Model {self.path}{kind} on {self.backend.info.label} {self.dtype}>"


def load(path_or_preset: str | None = None, device: str | Backend = "auto", dtype="auto",
         allow_fallback: bool = True, progress=None, max_device_memory=None, max_host_memory=None,
         offload: str = "auto", expert_cache: str = "lru", prefetch: bool | None = None,
         expert_stats: dict | None = None, eager: bool = False, prefix_caching: bool = False,
         tensor_parallel_size: int = 1, expert_parallel: bool = False,
         quantization: str | None = None, group_size: int | None = None,
         int8_activations: bool = False) -> Model:
    """Load a -PT checkpoint directory, a preset name (random weights), or None (the embedded
    default). `device` is a request ("auto", "rocm:1", ...) or a Backend object already built
    (pick_device's answer, or an emulated one). `progress(done_bytes, total_bytes)` is called
    while weights are read.

    Memory: `max_device_memory` / `max_host_memory` are bytes or strings ("40GiB", "16GB");
    `offload` is "auto" (stage what does not fit), "none" (fail unless everything fits),
    "layers" (whole layers resident or streamed) or "experts" (every non-expert weight resident,
    routed experts through the cache). `expert_cache` "lru" | "lfu"; `prefetch` of the next MoE
    layer's likely experts (None: when the cache has room for it); `expert_stats` {(layer,
    expert): uses} picks the resident experts (Model.model.weights.expert_stats() gives one).

    Decode steps replay captured device graphs where the backend can capture them and every
    weight is resident; `eager=True` turns that off (`Model.engine.decode_graphs` says which).
    `prefix_caching=True`: `generate` calls reuse the KV blocks of prompt prefixes that earlier
    calls computed (a conversation's earlier turns; the server has its own engine, on by default).

    `tensor_parallel_size=N` splits the model over N ranks (core/parallel): this process is rank 0
    and starts N - 1 worker processes (device i for rank i; on cpu N processes), or, under torchrun,
    joins the group torchrun started (ranks > 0 then follow rank 0's steps and exit when it does).
    `expert_parallel=True` gives each rank whole routed experts instead of a slice of every one.

    Weight-only quantization: `quantization` "wint8" | "wint4" quantizes every 2-D projection and
    the embedding at load, tensor by tensor (`group_size` -1 per channel, or a power of two >= 32
    along the input; defaults wint8 -1, wint4 128); "none" keeps them as they are; None takes
    what the checkpoint is (a quantized checkpoint from `ernie-hal quantize` loads as written,
    asking it for another scheme is a QuantError). `int8_activations=True` (quantized weights only,
    on backends whose capabilities say so) runs decode's quantized linears on activations
    quantized to int8 per block of 32, as llama.cpp's Q8_0 dot does: faster where decoding the
    weights binds, at ~5e-3 relative error per projection (kernels/reference/int8_activations.py)."""
    from .parallel.group import torchrun_env
    env = torchrun_env()
    if env is not None and env["world_size"] > 1:
        if tensor_parallel_size not in (1, env["world_size"]):
            from .parallel.group import ParallelError
            raise ParallelError(f"tensor_parallel_size {tensor_parallel_size} but torchrun started "
                                f"{env['world_size']} ranks (WORLD_SIZE); make them equal")
        tensor_parallel_size = env["world_size"]
    if tensor_parallel_size != 1:
        return _load_parallel(path_or_preset, device, dtype, allow_fallback, progress, tensor_parallel_size,
                              expert_parallel, env, prefix_caching,
                              budgets=(max_device_memory, max_host_memory, offload, expert_cache, prefetch),
                              quantization=quantization, group_size=group_size,
                              int8_activations=int8_activations)
    device_budget = parse_budget(max_device_memory, "max_device_memory (--max-device-memory)")
    host_budget = parse_budget(max_host_memory, "max_host_memory (--max-host-memory)")
    offload = OFFLOAD_ALIASES.get(offload.lower() if isinstance(offload, str) else offload, offload)
    if offload not in MODES:
        raise BudgetError(f"offload={offload!r} is not a mode; choose one of {', '.join(MODES)}")
    rss_before = psutil.Process().memory_info().rss
    backend = device if isinstance(device, Backend) else pick_device(device)
    path, random_weights = resolve_model_path(path_or_preset)
    ckpt = Checkpoint.open(path)
    config = ckpt.config
    dtype = resolve_dtype(dtype, backend, config)
    stored = qckpt.stored_spec(config)
    quant = _activations(qckpt.choose(stored, quantization, group_size, path), int8_activations, backend)
    graph = build(config, untied_head=ckpt.lm_head_name == "lm_head.weight", quant=quant)
    ckpt.validate(qckpt.expected_tensors(graph) if stored is not None else graph.expected_tensors())
    kernels = get_registry().kernel_table(backend, OpSpec.for_model(config, dtype, allow_fallback, quant))
    prepare = getattr(kernels, "prepare_weight", None) if quant is not None else None
    plan = plan_placement(graph, backend, device_budget, host_budget, offload, dtype, expert_stats=expert_stats)
    budgets = device_budget is not None or host_budget is not None
    if budgets:
        # on unified memory the host budget caps the device region too (plan.device_budget)
        backend.set_budget(plan.device_budget if backend.caps.unified_memory else device_budget)
    if plan.fully_resident and not budgets:
        total = graph.total_bytes
    else:
        total = sum(w.nbytes for w in graph.weights() if plan.tiers[w.name] in (DEVICE, HOST))
    done = [0]

    def tick(n):
        done[0] += n
        if progress is not None:
            progress(done[0], total)

    if plan.fully_resident and not budgets:
        weights = ResidentWeights(graph, ckpt, backend, dtype, progress=tick, prepare=prepare,
                                  stored_quant=stored is not None)
    else:
        if quant is not None and stored is None:
            refuse_streaming_requantized(graph, plan, path, quant)
        from .memory.offload import OffloadedWeights
        weights = OffloadedWeights(graph, ckpt, backend, dtype, plan, progress=tick, prefetch=prefetch,
                                   cache_policy=expert_cache, prepare=prepare, stored_quant=stored is not None)
    tokenizer = _load_tokenizer(path)
    return Model(path, config, backend, dtype, ErnieModel(graph, backend, kernels, weights, dtype),
                 tokenizer, random_weights, rss_before, plan=plan, eager=eager, prefix_caching=prefix_caching)


def _activations(quant, int8_activations: bool, backend):
    """The QuantSpec with int8 activations when asked and the backend has the kernels."""
    quant = with_int8_activations(quant, int8_activations)
    if quant is not None and quant.int8_activations and not backend.caps.int8_activations:
        raise QuantError(f"{backend.info.label} has no int8-activation kernels (the cpu backend has them); "
                         f"drop --int8-activations")
    return quant


def _load_parallel(path_or_preset, device, dtype, allow_fallback, progress, tp, expert_parallel, env,
                   prefix_caching, budgets, quantization=None, group_size=None, int8_activations=False) -> Model:
    """load() over a tensor-parallel group; see core/parallel. Quantization applies per rank: each
    rank packs (or reads packed) only its own slices, cut on group boundaries."""
    from .parallel.budgets import RankBudgets, plan_rank
    from .parallel.group import join_torchrun, launch_local
    from .parallel.layout import check, describe, layout
    from .parallel.model import build_rank
    rank_budgets = RankBudgets.parse(*budgets)
    rss_before = psutil.Process().memory_info().rss
    backend = device if isinstance(device, Backend) else pick_device(device)
    path, random_weights = resolve_model_path(path_or_preset)
    ckpt = Checkpoint.open(path)
    config = ckpt.config
    dtype = resolve_dtype(dtype, backend, config)
    quant = _activations(qckpt.choose(qckpt.stored_spec(config), quantization, group_size, path),
                         int8_activations, backend)
    graph = build(config, untied_head=ckpt.lm_head_name == "lm_head.weight", quant=quant)
    check(graph, tp, expert_parallel, quant)      # refuse before any process starts
    plans = None
    if rank_budgets is not None:                  # every rank's slices have rank 0's shapes: plan here first
        stored = qckpt.stored_spec(config) is not None
        plans = [plan_rank(graph, layout(graph, tp, r, expert_parallel), backend, dtype, rank_budgets, path,
                           stored)[1] for r in range(tp)]
    if env is not None:
        if env["local_rank"]:
            backend = pick_device(_rank_devices(backend, env["local_rank"] + 1)[env["local_rank"]])
        group = join_torchrun(env, backend.caps.collectives, backend.device)
    else:
        threads = max(1, torch.get_num_threads() // tp) if backend.caps.unified_memory else 0
        group = launch_local(tp, backend.caps.collectives, dict(
            path=path, devices=_rank_devices(backend, tp), dtype=str(dtype).replace("torch.", ""),
            expert_parallel=bool(expert_parallel), allow_fallback=allow_fallback, threads=threads,
            quantization=quant.scheme if quant else None, group_size=quant.group_size if quant else None,
            int8_activations=bool(quant and quant.int8_activations),
            budgets=rank_budgets.as_json() if rank_budgets is not None else None),
            device=backend.device)
    try:
        done = [0]

        def tick(n):
            done[0] += n
            if progress is not None:
                progress(done[0], graph.total_bytes // tp)

        model = build_rank(ckpt, backend, dtype, group, expert_parallel, allow_fallback, progress=tick,
                           rss_before=rss_before, quant=quant, budgets=rank_budgets)
        if group.rank != 0:         # torchrun: this rank follows rank 0 until it stops the group
            model.follow()
            group.close(stop=False)
            raise SystemExit(0)
    except BaseException as e:
        if not isinstance(e, SystemExit):
            group.fail(f"rank 0 could not load ({type(e).__name__}); the group is shut down")
        group.close()
        raise
    out = Model(path, config, backend, dtype, model, _load_tokenizer(path), random_weights, rss_before,
                plan=model.plan, eager=True, prefix_caching=prefix_caching)   # model.plan: rank 0's
    out.parallel = describe(graph, tp, expert_parallel, dtype, quant, plans=plans)
    for row, mem in zip(out.parallel["ranks"], model.rank_memory):
        row.update({k: v for k, v in mem.items() if k != "rank"})
    out.group = group
    import atexit
    atexit.register(group.close)  # a script that never closes still stops its workers
    return out


def _rank_devices(backend: Backend, n: int) -> list:
    """Device i for rank i, counted from the chosen one; host-memory devices (cpu) take N ranks."""
    count = len(get_registry().probe(backend.name).devices)
    base = backend.info.index
    if backend.caps.unified_memory and count < base + n:
        return [f"{backend.name}:{base}"] * n
    if count < base + n:
        raise ValueError(f"tensor parallel size {n} from {backend.info.label} needs {backend.name}:{base}.."
                         f"{backend.name}:{base + n - 1}; {count} {backend.name} device(s) visible")
    return [f"{backend.name}:{base + r}" for r in range(n)]


def parallel_plan(path_or_preset, tensor_parallel_size: int, expert_parallel: bool = False, dtype="bf16",
                  quantization: str | None = None, group_size: int | None = None) -> dict:
    """The tensor-parallel layout of a checkpoint or preset from its config alone (nothing is read
    or written): per rank its heads, vocabulary rows, experts and bytes; with `quantization`
    ("wint8" | "wint4", `group_size` as in load) the packed bytes, integers plus fp32 scales.
    A layout load would refuse (heads, widths, groups across ranks) raises the same LayoutError."""
    from .model.config import ModelConfig, preset
    from .parallel.layout import check, describe
    stored = None
    if path_or_preset is not None and os.path.isdir(path_or_preset):
        ckpt = Checkpoint.open(path_or_preset)
        config, untied = ckpt.config, ckpt.lm_head_name == "lm_head.weight"
        stored = qckpt.stored_spec(config)
    elif path_or_preset is None or defaults.is_preset(path_or_preset):
        config, untied = preset(path_or_preset or defaults.DEFAULT_PRESET), None
    else:
        resolve_model_path(path_or_preset)       # raises the usual "neither a directory nor a preset"
        config, untied = ModelConfig.from_file(path_or_preset), None
    quant = qckpt.choose(stored, quantization, group_size, path_or_preset or defaults.DEFAULT_PRESET)
    graph = build(config, untied_head=untied, quant=quant)
    check(graph, tensor_parallel_size, expert_parallel, quant)
    return describe(graph, tensor_parallel_size, expert_parallel, DTYPES[str(dtype).lower()], quant)
