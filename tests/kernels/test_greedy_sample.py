from __future__ import annotations

import pytest
import torch
from kernel_checks import needs_cuda

from baton.kernels.greedy_sample import greedy_sample, greedy_sample_reference


def check(logits: torch.Tensor, **kw) -> None:
    got, want = greedy_sample(logits, **kw), greedy_sample_reference(logits)
    n = logits.shape[0]
    assert torch.equal(got[:n], want[:n]), (got[:n], want[:n])  # the same token ids
    torch.testing.assert_close(got[n:], want[n:], rtol=0, atol=1e-4)  # and their log-probabilities


@pytest.mark.parametrize("n,vocab", [(1, 5000), (3, 2048), (2, 1000), (4, 9001)])
def test_greedy_sample_matches_argmax_and_log_softmax(device, n, vocab):
    """Ragged and even vocabularies, one and several rows, small chunks so that several programs share a row."""
    check(torch.randn(n, vocab, device=device) * 4, chunk=1024, block=256)


def test_ties_go_to_the_lowest_id_across_lanes_and_chunks(device):
    logits = torch.randn(2, 3000, device=device)
    logits[0, [2900, 1500, 700]] = 50.0  # three chunks hold the max: the lowest id wins
    logits[1, [513, 514, 257]] = 50.0  # within one chunk, in different lanes
    got = greedy_sample(logits, chunk=1024, block=256)
    assert got[:2].tolist() == [700.0, 257.0]


def test_bf16_logits_and_a_strided_view(device):
    """The sampler passes lm_head output in the model dtype, cut to the tokenizer's vocabulary (a row stride
    larger than the width)."""
    wide = (torch.randn(3, 2100, device=device) * 3).to(torch.bfloat16)
    check(wide[:, :2000], chunk=1024, block=256)


def test_minus_infinity_outside_one_token(device):
    """A row where every logit but one is -inf: that token, log-probability 0."""
    logits = torch.full((1, 3000), float("-inf"), device=device)
    logits[0, 2999] = 1.5
    got = greedy_sample(logits, chunk=1024, block=256)
    assert got.tolist() == [2999.0, 0.0]


@pytest.mark.gpu
@needs_cuda
def test_greedy_sample_at_llama3_vocab_on_the_gpu():
    for n in (1, 7, 64):
        check((torch.randn(n, 128256, device="cuda") * 5).to(torch.bfloat16))
