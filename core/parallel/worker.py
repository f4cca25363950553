"""A tensor-parallel worker rank, started by rank 0 (group.launch_local):
`python -m ernie_hal.core.parallel.worker '<json>'`. It joins the group, loads its slices of the
checkpoint, follows rank 0's steps, and exits when rank 0 stops the group or goes away."""

from __future__ import annotations

import json
import sys


def main(argv=None) -> int:
    args = json.loads((argv or sys.argv[1:])[0])
    import torch
    from ..model.checkpoint_reader import Checkpoint
    from ..plugins.registry import get_registry
    from ..quant import resolve, with_int8_activations
    from .budgets import RankBudgets
    from .group import join_local
    from .model import build_rank
    if args.get("threads"):
        torch.set_num_threads(args["threads"])
    rank = args["rank"]
    import psutil
    rss_before = psutil.Process().memory_info().rss
    try:
        backend = get_registry().pick(args["devices"][rank])
        group = join_local(args, backend.device)
        model = build_rank(Checkpoint.open(args["path"]), backend, getattr(torch, args["dtype"]), group,
                           args["expert_parallel"], allow_fallback=args["allow_fallback"], rss_before=rss_before,
                           quant=with_int8_activations(resolve(args.get("quantization"), args.get("group_size")),
                                                       bool(args.get("int8_activations"))),
                           budgets=RankBudgets(**args["budgets"]) if args.get("budgets") else None)
        model.follow()
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # one line for the user; rank 0 reports the group's failure
        print(f"ernie-hal: tensor-parallel rank {rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    group.close(stop=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
