"""Greedy sampling in two launches: per row, the argmax of the logits and its log-probability
(logit - logsumexp), written straight into the float64 buffer the sampler copies to the host.

The vocabulary is split into chunks so that even one row spreads over many programs (a single-row reduction in
one program reads a 128k vocabulary at a fraction of the bandwidth); each chunk keeps its max, its argmax and the
sum of exp(logit - max), and one program per row merges them. Replaces the float cast, log_softmax, argmax,
gather, casts and concatenation of the generic path (about eight kernels) when every row is greedy and nothing
else (bias, penalties, grammar, top logprobs) is asked for. Ties go to the lowest id, as torch.argmax."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _chunk_kernel(logits_ptr, max_ptr, idx_ptr, sum_ptr, stride_row, vocab, num_chunks,
                  CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    start = chunk * CHUNK
    best = tl.full((BLOCK,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BLOCK,), tl.int32)
    total = tl.zeros((BLOCK,), tl.float32)
    for off in range(0, CHUNK, BLOCK):
        cols = start + off + tl.arange(0, BLOCK)
        x = tl.load(logits_ptr + row * stride_row + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        new_best = tl.maximum(best, x)
        # Rescale the running sums to the new per-lane max (lanes still at -inf stay 0).
        total = tl.where(new_best == float("-inf"), 0.0, total * tl.exp(best - new_best) + tl.exp(x - new_best))
        best_idx = tl.where(x > best, cols, best_idx)  # strictly greater: the first (lowest) id wins a tie
        best = new_best
    m = tl.max(best, axis=0)
    idx = tl.min(tl.where(best == m, best_idx, 2147483647), axis=0)
    s = tl.sum(tl.where(best == float("-inf"), 0.0, total * tl.exp(best - m)), axis=0)
    out = row * num_chunks + chunk
    tl.store(max_ptr + out, m)
    tl.store(idx_ptr + out, idx)
    tl.store(sum_ptr + out, s)


@triton.jit
def _merge_kernel(logits_ptr, max_ptr, idx_ptr, sum_ptr, out_ptr, stride_row, n_rows, num_chunks,
                  BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    ok = c < num_chunks
    m = tl.load(max_ptr + row * num_chunks + c, mask=ok, other=float("-inf"))
    idx = tl.load(idx_ptr + row * num_chunks + c, mask=ok, other=2147483647)
    s = tl.load(sum_ptr + row * num_chunks + c, mask=ok, other=0.0)
    top = tl.max(m, axis=0)
    token = tl.min(tl.where(m == top, idx, 2147483647), axis=0)
    lse = top + tl.log(tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - top)), axis=0))
    chosen = tl.load(logits_ptr + row * stride_row + token).to(tl.float32)
    tl.store(out_ptr + row, token.to(tl.float64))
    tl.store(out_ptr + n_rows + row, (chosen - lse).to(tl.float64))


def greedy_sample(logits: torch.Tensor, out: torch.Tensor | None = None, chunk: int = 4096,
                  block: int = 1024) -> torch.Tensor:
    """logits [n, vocab] (any float dtype, unit column stride) -> float64 [2n]: n token ids, then their
    log-probabilities under softmax(logits)."""
    n, vocab = logits.shape
    assert logits.stride(1) == 1 and chunk % block == 0
    if out is None:
        out = torch.empty(2 * n, dtype=torch.float64, device=logits.device)
    num_chunks = triton.cdiv(vocab, chunk)
    part_max = torch.empty(n, num_chunks, dtype=torch.float32, device=logits.device)
    part_idx = torch.empty(n, num_chunks, dtype=torch.int32, device=logits.device)
    part_sum = torch.empty(n, num_chunks, dtype=torch.float32, device=logits.device)
    if n:
        _chunk_kernel[(n, num_chunks)](logits, part_max, part_idx, part_sum, logits.stride(0), vocab, num_chunks,
                                       CHUNK=chunk, BLOCK=block, num_warps=4)
        _merge_kernel[(n,)](logits, part_max, part_idx, part_sum, out, logits.stride(0), n, num_chunks,
                            BLOCK_C=max(2, triton.next_power_of_2(num_chunks)), num_warps=1)
    return out


def greedy_sample_reference(logits: torch.Tensor) -> torch.Tensor:
    x = logits.float()
    tokens = x.argmax(dim=-1)
    logprobs = torch.log_softmax(x, dim=-1).gather(1, tokens[:, None])[:, 0]
    return torch.cat([tokens.double(), logprobs.double()])
