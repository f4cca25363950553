"""Sort the T*k (token, slot) entries of a routing by expert and pad each expert's run to a
multiple of BLOCK_M, so that every BLOCK_M block of the grouped GEMM belongs to one expert.

Nothing here waits for the device: the outputs are sized by the worst case
T*k + min(E, T*k) * (BLOCK_M - 1), so the kernels' grid is known on the host; blocks past
`num_tokens_post_padded` exit at once. Two implementations with identical outputs: one Triton
program (`moe_align_kernel`, one launch: decode and small batches) and torch ops (a dozen small
launches, but a parallel sort: prefill); `moe_align_block_size` picks by T*k. (vLLM and SGLang
use a custom CUDA kernel.)

Example, T*k = 5 entries, experts [2, 0, 2, 2, 1], E = 4, BLOCK_M = 2:
    expert 0: entry 1       -> [1, 5]        (5 = T*k, the padding sentinel)
    expert 1: entry 4       -> [4, 5]
    expert 2: entries 0,2,3 -> [0, 2, 3, 5]
    sorted_token_ids = [1, 5, 4, 5, 0, 2, 3, 5, 5, ...], expert_ids = [0, 1, 2, 2, -1, ...],
    num_tokens_post_padded = [8]
"""

import torch
import triton

from .moe_kernels import moe_align_kernel

TRITON_MAX_ENTRIES = 4096  # above this the single-program kernel loses to a parallel sort


def max_padded_len(num_entries: int, num_experts: int, block_m: int) -> int:
    """Upper bound of num_tokens_post_padded: each expert that has tokens pads < BLOCK_M."""
    return num_entries + min(num_experts, num_entries) * (block_m - 1)


def moe_align_block_size(topk_ids: torch.Tensor, block_m: int, num_experts: int):
    """See moe_align_block_size_torch; one Triton launch for up to TRITON_MAX_ENTRIES entries."""
    n = topk_ids.numel()
    if n > TRITON_MAX_ENTRIES:
        return moe_align_block_size_torch(topk_ids, block_m, num_experts)
    num_blocks = -(-max_padded_len(n, num_experts, block_m) // block_m)
    device = topk_ids.device
    sorted_ids = torch.empty(num_blocks * block_m, dtype=torch.int32, device=device)
    expert_ids = torch.empty(num_blocks, dtype=torch.int32, device=device)
    num_post = torch.empty(1, dtype=torch.int32, device=device)
    block_e = triton.next_power_of_2(num_experts)
    flat = topk_ids.reshape(-1).contiguous()
    moe_align_kernel[(1,)](flat, sorted_ids, expert_ids, num_post, n, num_experts, num_blocks,
                           BLOCK_M=block_m, BLOCK_E=block_e,
                           CHUNK=max(16, min(256, 8192 // block_e)),
                           CHUNK_B=max(1, min(16, 4096 // max(block_m, block_e))), num_warps=4)
    return sorted_ids, expert_ids, num_post


def moe_align_block_size_torch(topk_ids: torch.Tensor, block_m: int, num_experts: int):
    """topk_ids [T, k] (any int dtype) ->
    sorted_token_ids [L] int32: flat entry ids t*k + j grouped by expert (stable, so token order
        is kept within an expert), each expert's run padded with the sentinel T*k to a multiple
        of block_m; L = max_padded_len(...) rounded up to block_m, sentinel-filled past the end.
    expert_ids [L // block_m] int32: the expert of each block, -1 past the end.
    num_tokens_post_padded [1] int32: the used length (a multiple of block_m).
    Experts with no tokens get no block."""
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)                       # [n], entry = t*k + j
    n = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))               # [E] (bincount would sync)
    padded = (counts + block_m - 1) // block_m * block_m              # [E]
    ends = padded.cumsum(0)                                           # [E] end of each run
    order = torch.argsort(flat, stable=True)                          # [n] entries by expert
    sorted_e = flat[order]                                            # [n] their experts
    first = counts.cumsum(0) - counts                                 # [E] start in `order`
    dest = (ends - padded)[sorted_e] + torch.arange(n, device=device) - first[sorted_e]
    num_blocks = -(-max_padded_len(n, num_experts, block_m) // block_m)
    sorted_ids = torch.full((num_blocks * block_m,), n, dtype=torch.int32, device=device)
    sorted_ids[dest] = order.to(torch.int32)
    block_start = torch.arange(num_blocks, device=device) * block_m   # [B]
    expert_ids = torch.searchsorted(ends, block_start, right=True)    # run that holds the block
    total = ends[-1:]
    expert_ids = torch.where(block_start < total, expert_ids, -1).to(torch.int32)
    return sorted_ids, expert_ids, total.to(torch.int32)
