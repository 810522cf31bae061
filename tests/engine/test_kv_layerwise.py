"""Layer-wise KV hand-off (`--kv-layerwise`): the prefill engine feeds each layer to the transport as soon as it is
written, the ipc transport copies it beside the later layers, and the decode engine continues token-exact."""
from __future__ import annotations

import random
import time

import pytest
import torch

from baton.engine.config import EngineConfig
from baton.engine.kv_transfer import create_transport
from baton.engine.kv_transfer.base import LayerwiseSend
from baton.engine.llm_engine import LLMEngine
from baton.engine.sampling_params import SamplingParams
from tests.engine.checkpoints import make_hf_checkpoint

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
BLOCK = (4, 2, 16, 2, 32)  # [num_layers, 2, block_size, num_kv_heads, head_dim]
SRC = [5, 6, 7, 30, 2, 11, 12]
DST = [40, 41, 42, 3, 17, 9, 10]


def cache(num_blocks: int, seed: int | None = None) -> torch.Tensor:
    if seed is None:
        return torch.full((num_blocks, *BLOCK), -7.0)
    return torch.randn((num_blocks, *BLOCK), generator=torch.Generator().manual_seed(seed))


def wait_until(check, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_each_layer_is_copied_as_soon_as_it_is_fed(pair):
    src, dst = cache(32, seed=1), cache(48)
    sender, receiver = pair("ipc", src, dst)
    table = [0, 1, *SRC]  # the first two blocks are cached on the receiver already
    receiver.expect("t1", DST)
    send = sender.start_layerwise(receiver.endpoint(), "t1", 2, DST, timeout_s=10)
    send.layer_ready(0, table)
    wait_until(lambda: torch.equal(dst[DST, 0], src[SRC, 0]))
    assert bool((dst[DST, 1:] == -7.0).all()), "a layer not fed yet was copied"
    assert not receiver.wait("t1", timeout_s=0.05).ok, "the hand-off completed before finish()"
    receiver.expect("t1", DST)
    for layer in range(1, BLOCK[0]):
        send.layer_ready(layer, table)
    sent = send.finish(SRC)
    got = receiver.wait("t1", timeout_s=5)
    assert sent.ok and got.ok, (sent, got)
    assert sent.nbytes == got.nbytes == len(SRC) * src[0].numel() * 4
    assert torch.equal(dst[DST], src[SRC])
    untouched = sorted(set(range(48)) - set(DST))
    assert bool((dst[untouched] == -7.0).all())


def test_layers_never_fed_are_sent_at_finish(pair):
    src, dst = cache(32, seed=2), cache(48)
    sender, receiver = pair("ipc", src, dst)
    receiver.expect("t2", DST)
    send = sender.start_layerwise(receiver.endpoint(), "t2", 0, DST, timeout_s=10)
    send.layer_ready(2, SRC)  # e.g. a step that ran through a path without the per-layer hook
    assert send.finish(SRC).ok and receiver.wait("t2", timeout_s=5).ok
    assert torch.equal(dst[DST], src[SRC])


def test_a_block_count_mismatch_writes_nothing_and_fails_at_finish(pair):
    src, dst = cache(32, seed=3), cache(48)
    sender, receiver = pair("ipc", src, dst)
    send = sender.start_layerwise(receiver.endpoint(), "t3", 0, DST, timeout_s=10)
    for layer in range(BLOCK[0]):
        send.layer_ready(layer, SRC[:-1])
    result = send.finish(SRC[:-1])
    assert not result.ok and "7 destination blocks for 6 uncached prompt blocks" in result.error
    assert bool((dst == -7.0).all())


def test_nothing_is_written_past_the_deadline(pair):
    src, dst = cache(32, seed=4), cache(48)
    sender, receiver = pair("ipc", src, dst)
    receiver.expect("t4", DST)
    send = sender.start_layerwise(receiver.endpoint(), "t4", 0, DST, timeout_s=0.05)
    time.sleep(0.1)
    send.layer_ready(0, SRC)
    result = send.finish(SRC)
    assert not result.ok and "deadline" in result.error
    assert bool((dst == -7.0).all())
    assert not receiver.wait("t4", timeout_s=0.1).ok


def test_abandoned_hand_off_never_completes_on_the_receiver(pair):
    src, dst = cache(32, seed=5), cache(48)
    sender, receiver = pair("ipc", src, dst)
    receiver.expect("t5", DST)
    send = sender.start_layerwise(receiver.endpoint(), "t5", 0, DST, timeout_s=10)
    send.layer_ready(0, SRC)
    send.abandon()
    result = receiver.wait("t5", timeout_s=0.2)
    assert not result.ok and "timed out" in result.error


def test_bad_destinations_are_refused_at_start(pair):
    sender, receiver = pair("ipc", cache(32), cache(48))
    with pytest.raises(ValueError, match="distinct"):
        sender.start_layerwise(receiver.endpoint(), "t6", 0, [1, 1], timeout_s=1)
    with pytest.raises(ValueError, match="destination"):
        sender.start_layerwise(receiver.endpoint(), "t6", 0, [48], timeout_s=1)


def test_transports_without_layer_wise_copies_send_everything_at_finish():
    sender, receiver = create_transport("tcp"), create_transport("tcp")
    try:
        src, dst = cache(32, seed=6), cache(48)
        sender.register_cache(src)
        receiver.register_cache(dst)
        assert not sender.supports_layerwise
        receiver.expect("t7", DST)
        send = sender.start_layerwise(receiver.endpoint(), "t7", 0, DST, timeout_s=10)
        send.layer_ready(0, SRC)
        assert bool((dst == -7.0).all())
        assert send.finish(SRC).ok and receiver.wait("t7", timeout_s=5).ok
        assert torch.equal(dst[DST], src[SRC])
    finally:
        sender.close()
        receiver.close()


class Recorder(LayerwiseSend):
    """Wraps a real layer-wise send and records which engine step fed which layer."""

    def __init__(self, inner: LayerwiseSend, engine: LLMEngine) -> None:
        self.inner, self.engine, self.fed = inner, engine, []

    def layer_ready(self, layer, block_table) -> None:
        self.fed.append((self.engine.steps, layer, list(block_table)))
        self.inner.layer_ready(layer, block_table)

    def finish(self, src_block_ids):
        return self.inner.finish(src_block_ids)

    def abandon(self) -> None:
        self.inner.abandon()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_hf_checkpoint(tmp_path_factory.mktemp("lw") / "llama", "llama", seed=5, max_position=1024))


def engine_of(model_dir, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model_dir, show_progress=False, num_kv_blocks=64, **kw))


def test_chunked_prefill_hands_off_layer_by_layer_and_decode_continues_token_exact(model_dir):
    rng = random.Random(7)
    prompt = [rng.randrange(3, 256) for _ in range(150)]
    expected = engine_of(model_dir).generate([prompt], GREEDY)[0].output_ids
    a = engine_of(model_dir, max_num_batched_tokens=64)  # the prompt runs in 3 chunks
    b = engine_of(model_dir)
    b.generate([prompt[:40] + [9]], GREEDY)  # the decode engine caches the first 2 blocks already
    sender, receiver = create_transport("ipc"), create_transport("ipc")
    try:
        sender.register_cache(a.kv_cache)
        receiver.register_cache(b.kv_cache)
        reservation = b.reserve_remote("r", prompt, GREEDY)
        skip = reservation.num_cached_tokens // 16
        assert skip == 2
        dst = reservation.block_ids[skip:]
        receiver.expect("r", dst)
        steps = []
        a.steps = 0
        sink = Recorder(sender.start_layerwise(receiver.endpoint(), "r", skip, dst, timeout_s=30), a)
        a.add_request("r", prompt, GREEDY, prefill_only=True, kv_sink=sink)
        first = None
        while first is None:
            a.steps += 1
            steps.append(a.steps)
            first = next((o for o in a.step() if o.request_id == "r"), None)
        assert len(steps) == 3
        layers = a.model_config.num_layers
        # Only the step that completes the prompt feeds the hand-off, every layer once, in order, all blocks.
        assert [(step, layer) for step, layer, _ in sink.fed] == [(3, layer) for layer in range(layers)]
        assert all(table == first.block_ids for _, _, table in sink.fed)
        assert sink.finish(first.block_ids[skip:]).ok
        assert receiver.wait("r", timeout_s=5).ok
        a.release("r")
        tokens = b.commit_remote("r", first.new_token_ids[0], first.new_logprobs[0]).new_token_ids
        while b.has_unfinished():
            for out in b.step():
                tokens += out.new_token_ids
        assert tokens == expected
    finally:
        sender.close()
        receiver.close()


def test_a_layer_wise_hand_off_needs_a_prefill_only_request(model_dir):
    from baton.engine.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="prefill-only"):
        engine_of(model_dir).add_request("x", [5, 6, 7], GREEDY, kv_sink=object())
