"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds, logprobs of the chosen token."""
from __future__ import annotations

import torch

from baton.engine.sampling_params import SamplingParams


class Sampler:
    """Samples where the logits are (the GPU too) and brings back ids and logprobs in one device-to-host copy."""

    def __init__(self, seed: int = 0) -> None:
        self._seed = seed
        self._defaults: dict[torch.device, torch.Generator] = {}
        self._generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, request_id: str, params: SamplingParams, device: torch.device) -> torch.Generator:
        if params.seed is None:
            gen = self._defaults.get(device)
            if gen is None:
                gen = self._defaults[device] = torch.Generator(device).manual_seed(self._seed)
            return gen
        gen = self._generators.get(request_id)
        if gen is None:
            gen = self._generators[request_id] = torch.Generator(device).manual_seed(params.seed)
        return gen

    def sample(
        self, logits: torch.Tensor, requests: list[tuple[str, SamplingParams]]
    ) -> tuple[list[int], list[float]]:
        """logits: [n, vocab] float32, one row per request. Returns chosen ids and their logprobs."""
        logits = logits.float()
        tokens = logits.argmax(dim=-1)
        for row, (request_id, params) in enumerate(requests):
            if not params.greedy:
                probs = _filtered_probs(logits[row], params)
                tokens[row] = torch.multinomial(probs, 1, generator=self._generator(request_id, params,
                                                                                     logits.device))[0]
        chosen = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0]
        # float64 holds every token id exactly: ids and logprobs come back in a single copy (one host sync).
        both = torch.stack((tokens.double(), chosen.double())).tolist()
        return [int(t) for t in both[0]], both[1]


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
