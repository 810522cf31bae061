"""Per-request state does not outlive its request: after many requests of every kind (finished, stopped by a stop
string, seeded with penalties, aborted mid-decode, prefill-only then released, reserved for a remote prefill then
committed or aborted, resumed) the engine's and the sampler's per-request maps are empty and no block is in use."""
from __future__ import annotations

import random

import pytest

from baton.engine.config import EngineConfig
from baton.engine.llm_engine import LLMEngine
from baton.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> LLMEngine:
    from baton.devtools.make_model import make_model

    # make_model writes a tokenizer too: without one the engine tracks no text (and no stop strings).
    model_dir = make_model(tmp_path_factory.mktemp("m") / "llama", arch="llama", layers=2, hidden=64, heads=4,
                           kv_heads=2, vocab=512, max_position=1024, seed=5)
    return LLMEngine(EngineConfig(str(model_dir), show_progress=False, num_kv_blocks=128))


def _per_request_maps(engine: LLMEngine) -> dict[str, int]:
    return {"seqs": len(engine._seqs), "text": len(engine._text), "prefilled": len(engine._prefilled),
            "pending_remote": len(engine._pending_remote), "generators": len(engine.sampler._generators),
            "prompt_masks": len(engine.sampler._prompt_masks)}


def _drain(engine: LLMEngine) -> None:
    while engine.has_unfinished():
        engine.step()


def test_per_request_state_is_dropped_whatever_way_a_request_ends(engine):
    rng = random.Random(0)
    kinds = [
        SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=6, temperature=0.9, seed=7, repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.0, stop=["e", "a", "o"], ignore_eos=True),
    ]
    n = 0
    for round_ in range(6):
        ids = []
        for params in kinds:
            rid = f"r{n}"
            n += 1
            engine.add_request(rid, [rng.randrange(3, 256) for _ in range(rng.randrange(4, 40))], params)
            ids.append(rid)
        engine.step()
        live = _per_request_maps(engine)  # the maps this test watches do hold the live requests' state
        assert live["text"] == live["seqs"] >= 2 and live["generators"] == live["prompt_masks"] == 1, live
        engine.abort(ids[round_ % len(ids)])  # one of them mid-flight
        _drain(engine)
        # Prefill-only, handed off, then released.
        engine.add_request(f"p{round_}", [rng.randrange(3, 256) for _ in range(20)], kinds[1], prefill_only=True)
        _drain(engine)
        assert engine.release(f"p{round_}")
        # Reserved for a remote prefill: committed and decoded, or aborted before the KV arrived.
        engine.reserve_remote(f"c{round_}", [rng.randrange(3, 256) for _ in range(20)], kinds[1])
        engine.commit_remote(f"c{round_}", 42)
        engine.reserve_remote(f"x{round_}", [rng.randrange(3, 256) for _ in range(20)], kinds[0])
        engine.abort(f"x{round_}")
        # Resumed on this engine after tokens came from another.
        engine.add_request(f"m{round_}", [5, 6, 7, 8], kinds[1], generated_ids=[9, 10])
        _drain(engine)
    assert _per_request_maps(engine) == dict.fromkeys(_per_request_maps(engine), 0)
    blocks = engine.stats().blocks
    assert blocks.in_use == 0, blocks
