"""Sizing the KV pool on a GPU (nano-vllm's order): weights are loaded, one step at the largest prefill is
profiled, and the pool gets what is left of this engine's share of the device."""
from __future__ import annotations

import torch

from baton.engine.attention import allocate_kv_cache
from baton.engine.config import EngineConfig, ModelConfig
from baton.engine.model import CausalLM

_HEADROOM_BYTES = 512 * 2**20  # CUDA graphs' pool, sampler scratch, allocator fragmentation


def kv_blocks_for_gpu(model: CausalLM, config: EngineConfig, mc: ModelConfig, block_nbytes: int,
                      held_before: int = 0) -> int:
    """KV blocks that fit this engine's share (gpu_memory_utilization of the device) once its weights and one
    largest step are counted. held_before: bytes this process had allocated before this engine loaded its weights
    (another engine in the process), not counted against this engine's share."""
    from baton.engine.attention_triton import build_triton_batch

    device = torch.device(config.device)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    n = max(1, min(config.max_num_batched_tokens, mc.max_position))
    bs = config.block_size
    blocks = -(-n // bs)
    cache = allocate_kv_cache(blocks, mc.num_layers, bs, mc.num_kv_heads, mc.head_dim,
                              config.resolve_kv_cache_dtype(next(model.parameters()).dtype), device)
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    batch = build_triton_batch([(0, n, list(range(blocks)))], bs, mc.head_dim ** -0.5, device, num_sms,
                               mc.num_kv_heads)
    ids = torch.zeros(n, dtype=torch.long, device=device)
    model(ids, torch.arange(n, device=device), cache, batch, torch.tensor([n - 1], device=device))
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - cache.numel() * cache.element_size() - held_before
    del cache
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    # Decode logits of a full batch are float32 [max_num_seqs, vocab], a few copies of them while sampling.
    logits = 3 * config.max_num_seqs * mc.vocab_size * 4
    budget = total * config.gpu_memory_utilization - peak - logits - _HEADROOM_BYTES
    budget = min(budget, free - logits - _HEADROOM_BYTES)  # other processes may hold part of the device
    if budget < block_nbytes:
        raise RuntimeError(
            f"no GPU memory left for the KV cache: {total / 2**30:.1f} GiB device, "
            f"gpu_memory_utilization {config.gpu_memory_utilization}, weights and a {n}-token step take "
            f"{peak / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free; raise --gpu-memory-utilization or lower "
            f"--max-num-batched-tokens")
    return int(budget // block_nbytes)
