"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds, logprobs of the chosen token."""
from __future__ import annotations

import torch

from baton.engine.sampling_params import SamplingParams


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self._default = torch.Generator().manual_seed(seed)
        self._generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, request_id: str, params: SamplingParams) -> torch.Generator:
        if params.seed is None:
            return self._default
        gen = self._generators.get(request_id)
        if gen is None:
            gen = self._generators[request_id] = torch.Generator().manual_seed(params.seed)
        return gen

    def sample(
        self, logits: torch.Tensor, requests: list[tuple[str, SamplingParams]]
    ) -> tuple[list[int], list[float]]:
        """logits: [n, vocab] float32, one row per request. Returns chosen ids and their logprobs."""
        logits = logits.float().cpu()
        logprobs_all = torch.log_softmax(logits, dim=-1)
        greedy_ids = logits.argmax(dim=-1)
        tokens: list[int] = []
        for row, (request_id, params) in enumerate(requests):
            if params.greedy:
                token = int(greedy_ids[row])
            else:
                probs = _filtered_probs(logits[row], params)
                token = int(torch.multinomial(probs, 1, generator=self._generator(request_id, params)))
            tokens.append(token)
        chosen = logprobs_all[torch.arange(len(tokens)), torch.tensor(tokens, dtype=torch.long)]
        return tokens, chosen.tolist()


def _filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    scaled = logits / params.temperature
    if params.top_k > 0 and params.top_k < scaled.numel():
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (the top token always survives)
        drop = cumulative - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        probs = probs / probs.sum()
    return probs
