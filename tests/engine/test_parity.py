"""Greedy output matches Hugging Face transformers token for token on the same float32 weights."""
from __future__ import annotations

import random

import pytest
import torch

from baton.engine.config import EngineConfig
from baton.engine.llm_engine import LLMEngine
from baton.engine.sampling_params import SamplingParams
from tests.engine.checkpoints import make_hf_checkpoint

PROMPT_LENGTHS = [1, 7, 16, 17, 100, 320]
NEW_TOKENS = 64


def hf_greedy(model_dir, prompt: list[int], new_tokens: int) -> list[int]:
    import transformers

    model = hf_greedy.cache.get(model_dir)
    if model is None:
        model = hf_greedy.cache[model_dir] = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


hf_greedy.cache = {}


@pytest.mark.parametrize("arch,tie", [("llama", False), ("llama3", True), ("mistral", False),
                                      ("qwen2", True), ("qwen3", False)])
def test_greedy_matches_transformers(tmp_path, arch, tie):
    model_dir = make_hf_checkpoint(tmp_path / arch, arch, seed=7, tie=tie)
    rng = random.Random(arch)
    prompts = [[rng.randrange(3, 256) for _ in range(n)] for n in PROMPT_LENGTHS]
    engine = LLMEngine(EngineConfig(str(model_dir), num_kv_blocks=256, max_num_batched_tokens=256,
                                    show_progress=False))
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    seqs = engine.generate(prompts, params)  # all prompts in one continuous batch, with chunked prefill
    for prompt, seq in zip(prompts, seqs):
        assert seq.output_ids == hf_greedy(str(model_dir), prompt, NEW_TOKENS), f"prompt of {len(prompt)} tokens"
    stats = engine.stats().blocks
    assert stats.in_use == 0 and stats.free + stats.cached == stats.total
