"""--calculate-kv-scales: an FP8 KV cache's per-layer K and V scales, measured once at start-up on a built-in
calibration text run through the model over a model-dtype cache (absmax / 448 with a margin), then frozen."""
from __future__ import annotations

import logging

import torch

from baton.engine.attention import FP8_MAX, allocate_kv_cache, build_batch
from baton.engine.config import EngineConfig
from baton.engine.model import CausalLM

log = logging.getLogger(__name__)

# Headroom over the calibration text's absmax: a served prompt's keys and values may reach a little further
# (values past the range saturate to ±448 * scale). 1.25 moves e4m3's ~17 binades of range (2^-9 to 448) down
# by a third of one, at the small end where values matter least. SmolLM2-135M's perplexity on bench/fp8.py's
# text (bf16 cache 17.68) moved within FP8's own noise, 17.89 to 18.18, for margins 1 to 3; 1.25 gave 17.89.
MARGIN = 1.25
# Tokens of each calibration prompt: fixed, not from the engine's step budget, so that the scales depend only on
# the model (and the device's arithmetic), never on how one worker is sized.
CALIBRATION_PROMPT_TOKENS = 256

# Varied on purpose (prose, dialogue, code, numbers, a list): what a server is asked, not one genre.
CALIBRATION_TEXT = """\
The lighthouse keeper woke before dawn, as he had for thirty-one years, and climbed the spiral stairs to trim \
the wick. Outside, the fog rolled in from the north, thick enough that the foghorn would sound until noon. \
"Will the supply boat come today?" his daughter asked. "Not in this weather," he said, "maybe on Thursday."

Photosynthesis converts light energy into chemical energy: plants take in carbon dioxide and water and, using \
sunlight absorbed by chlorophyll, produce glucose and release oxygen. The overall reaction is \
6 CO2 + 6 H2O -> C6H12O6 + 6 O2.

def merge_sorted(a: list[int], b: list[int]) -> list[int]:
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i]); i += 1
        else:
            out.append(b[j]); j += 1
    return out + a[i:] + b[j:]

Quarterly results (in millions of USD): revenue 1,284.7 (+12.3% year over year), operating income 214.9, \
net margin 11.8%. Shipping dates: 2024-03-15, 2024-06-30 and 2024-09-12; order #A-77341 is pending.

Steps to reset the router: 1) unplug it for 30 seconds; 2) hold the reset button for 10 seconds; \
3) connect to http://192.168.0.1 and log in as admin. Bonjour, comment allez-vous ? Très bien, merci. \
¿Dónde está la estación de tren? Guten Morgen! Translate to English: "Le chat dort sur le canapé."
"""


class _AbsmaxObserver:
    """An attention batch that also keeps each layer's absmax of the K (after RoPE) and V it writes: what an
    FP8 cache would store. No slot_mapping attribute, so the GPU path writes through write_kv, not the fused
    RoPE + KV-write kernel."""

    def __init__(self, batch, num_layers: int, device: torch.device) -> None:
        self.batch = batch
        self.absmax = torch.zeros(num_layers, 2, dtype=torch.float32, device=device)

    def write_kv(self, kv_cache, layer: int, k: torch.Tensor, v: torch.Tensor, kv_scale=None) -> None:
        self.absmax[layer, 0] = k.abs().amax().float()
        self.absmax[layer, 1] = v.abs().amax().float()
        self.batch.write_kv(kv_cache, layer, k, v, kv_scale)

    def attend(self, *args, **kwargs) -> torch.Tensor:
        return self.batch.attend(*args, **kwargs)


def calibration_prompts(tokenizer, vocab_size: int, max_position: int) -> list[list[int]]:
    """The calibration text as a chat request (the template's special tokens) and as plain text (a completion
    starts with any token, and the first token's keys and values are often a layer's largest); without a
    tokenizer, a fixed pseudo-random id sequence."""
    n = min(CALIBRATION_PROMPT_TOKENS, max_position)
    if tokenizer is None:
        return [torch.randint(0, vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()]
    prompts = [tokenizer.encode(CALIBRATION_TEXT)[:n]]
    if tokenizer.chat_template is not None:
        prompts.insert(0, tokenizer.encode_chat([{"role": "user", "content": CALIBRATION_TEXT}])[:n])
    return prompts


@torch.no_grad()
def measure_kv_absmax(model: CausalLM, prompts: list[list[int]], block_size: int, triton: bool) -> torch.Tensor:
    """float32 [layers, 2]: absmax of every layer's K and V over `prompts`, run as one batch over a model-dtype
    cache of its own (nothing is quantized, the engine's pool is not touched). triton: the GPU's attention path."""
    mc = model.config
    device = next(model.parameters()).device
    queries, ids, positions, blocks = [], [], [], 0
    for prompt in prompts:
        used = -(-len(prompt) // block_size)
        queries.append((0, len(prompt), list(range(blocks, blocks + used))))
        blocks += used
        ids += prompt
        positions += range(len(prompt))
    cache = allocate_kv_cache(blocks, mc.num_layers, block_size, mc.num_kv_heads, mc.head_dim,
                              next(model.parameters()).dtype, device)
    if triton:
        from baton.engine.attention_triton import build_triton_batch

        num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        batch = build_triton_batch(queries, block_size, mc.head_dim ** -0.5, device, num_sms, mc.num_kv_heads)
    else:
        batch = build_batch(queries, cache, mc.sliding_window)
    observer = _AbsmaxObserver(batch, mc.num_layers, device)
    model(torch.tensor(ids, device=device), torch.tensor(positions, device=device), cache, observer,
          torch.tensor([len(ids) - 1], device=device))
    return observer.absmax


def scales_from_absmax(absmax: torch.Tensor) -> torch.Tensor:
    return (absmax * MARGIN / FP8_MAX).clamp(min=1e-8)


def calculate_kv_scales(model: CausalLM, config: EngineConfig, tokenizer) -> None:
    """Sets model.kv_scales, in place, from the calibration text; keeps a checkpoint's own scales.

    Run once by the engine's constructor, before the pool exists: no request is admitted, no block written and
    no CUDA graph captured yet, and nothing ever calls it again, so every KV ever stored uses these scales.
    Why a fixed text at start-up and not vLLM's first prompt: a decode worker's pool is filled by prefill workers'
    hand-offs before it runs a prompt of its own, so blocks would arrive written under scales it has not settled
    yet, and a prefill worker calibrated on another first prompt would write under scales its decode worker does
    not read with. The same model and text give every replica the same scales before it serves anything.
    """
    mc = model.config
    if model.kv_scales_from_checkpoint:
        log.info("FP8 KV cache: the checkpoint has K/V scales; --calculate-kv-scales keeps them",
                 extra={"kv_scales_source": "checkpoint"})
        return
    prompts = calibration_prompts(tokenizer, mc.vocab_size, mc.max_position)
    absmax = measure_kv_absmax(model, prompts, config.block_size, triton=torch.device(config.device).type == "cuda")
    model.kv_scales.copy_(scales_from_absmax(absmax))
    scales = model.kv_scales.tolist()
    tokens = sum(map(len, prompts))
    log.info("FP8 KV cache scales calculated on %d calibration tokens: K %s, V %s", tokens,
             [round(k, 6) for k, _ in scales], [round(v, 6) for _, v in scales],
             extra={"kv_scales_source": "calculated", "calibration_tokens": tokens,
                    "k_scales": [k for k, _ in scales], "v_scales": [v for _, v in scales]})
