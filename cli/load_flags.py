"""The loading flags `generate`, `chat` and `serve` share, and the load() keywords they become."""


def add_load_flags(p) -> None:
    p.add_argument("--no-fallback", action="store_true",
                   help="fail instead of running an op on the reference kernels when the backend lacks it")
    p.add_argument("--max-device-memory", default=None, metavar="SIZE",
                   help="device memory the model may use, e.g. 40GiB (on cpu: the budgeted region)")
    p.add_argument("--max-host-memory", default=None, metavar="SIZE",
                   help="host memory for pinned copies and staging, e.g. 16GiB (on cpu it caps everything)")
    p.add_argument("--offload", default="auto", choices=["auto", "none", "layers", "experts"],
                   help="auto: stage what does not fit; none: fail unless it all fits; layers: whole layers; "
                        "experts: non-expert weights resident, routed experts through a cache")
    p.add_argument("--expert-cache", default="lru", choices=["lru", "lfu"],
                   help="eviction policy of the device-side expert cache")
    p.add_argument("--tensor-parallel-size", "--tp", type=int, default=1, metavar="N", dest="tensor_parallel_size",
                   help="split the model over N ranks: N worker processes on this machine (device i for rank i), "
                        "or the ranks torchrun started")
    p.add_argument("--expert-parallel", action="store_true",
                   help="with --tp: give each rank whole routed experts instead of a slice of every expert")
    p.add_argument("--quantization", default=None, choices=["none", "wint8", "wint4"],
                   help="weight-only quantization at load: wint8 (per channel by default) or wint4 (groups of "
                        "128); default: as the checkpoint is (a checkpoint from `ernie-hal quantize` loads packed)")
    p.add_argument("--group-size", type=int, default=None, metavar="N",
                   help="quantization group along the input dimension: -1 per channel, or a power of two >= 32")
    p.add_argument("--int8-activations", action="store_true",
                   help="with quantized weights: decode multiplies int8-quantized activations (blocks of 32, as "
                        "llama.cpp's Q8_0 dot), faster on CPU at ~5e-3 relative error per projection")
    p.add_argument("--eager", action="store_true",
                   help="launch every decode step op by op instead of replaying captured device graphs")


def load_kwargs(args) -> dict:
    return dict(device=args.device, dtype=args.dtype, allow_fallback=not args.no_fallback,
                max_device_memory=args.max_device_memory, max_host_memory=args.max_host_memory,
                offload=args.offload, expert_cache=args.expert_cache, eager=args.eager,
                tensor_parallel_size=args.tensor_parallel_size, expert_parallel=args.expert_parallel,
                quantization=args.quantization, group_size=args.group_size,
                int8_activations=args.int8_activations)
