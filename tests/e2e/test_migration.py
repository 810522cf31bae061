"""Request migration on real processes: SIGKILL the decode worker serving greedy streams; each stream goes on
on the other decode worker and ends with the text of an undisturbed run, and the survivors hold no leaked block."""
from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest

from tests.e2e.conftest import start_cluster
from tests.e2e.test_openai_e2e import LONG, worker_stats

pytestmark = pytest.mark.slow
MAX_TOKENS = 800
STREAMS = 4
# Tokens the victim's requests must still have to go when it is killed (a lower bound read just before the
# SIGKILL), so the kill lands mid-stream; far more than the few tokens decoded between the read and the kill.
# (400 was too strict: a loaded CI machine once read 393 left, still well mid-stream.)
LEFT_AT_KILL = 100


@pytest.fixture(scope="module")
def cluster(e2e_model_dir, tmp_path_factory):
    cluster = start_cluster(e2e_model_dir, tmp_path_factory.mktemp("migrate"), prefill=1, decode=2,
                            local_prefill_threshold=16, routing="least_load")
    yield cluster
    cluster.stop()


def undisturbed_text(e2e_model_dir, prompts: list[str]) -> list[str]:
    """What the engine streams for each prompt run alone, with no worker in between."""
    from baton.engine.config import EngineConfig
    from baton.engine.llm_engine import LLMEngine
    from baton.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(str(e2e_model_dir), num_kv_blocks=256, show_progress=False))
    texts = []
    for i, prompt in enumerate(prompts):
        engine.add_request(f"ref{i}", engine.tokenizer.encode(prompt),
                           SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
        text = ""
        while engine.has_unfinished():
            text += "".join(out.text for out in engine.step())
        texts.append(text)
    return texts


def _text_of(lines: list[str]) -> str:
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: ") and line != "data: [DONE]"]
    assert all("error" not in e for e in events), [e for e in events if "error" in e]
    return "".join(e["choices"][0]["text"] for e in events)


def _settled(cluster, worker_ids: set[str], timeout_s: float = 30.0) -> dict[str, dict]:
    """Stats of the given workers once none holds a request or a block (or whatever they hold at the deadline)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = {w: s for w, s in worker_stats(cluster).items() if w in worker_ids}
        idle = all(int(s["num_requests_running"]) == 0 and int(s["kv_blocks_used"]) == 0 for s in stats.values())
        if (idle and len(stats) == len(worker_ids)) or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def _kill_a_busy_decode_worker(workers: dict) -> tuple[str, dict]:
    """SIGKILLs the first decode worker running a request, right after reading its stats; returns both."""
    for worker_id, record in sorted(workers.items()):
        if record.pool != "decode":
            continue
        stats = httpx.get(f"http://{record.http_address}/stats", timeout=5).json()
        if int(stats["num_requests_running"]):
            os.kill(int(stats["pid"]), signal.SIGKILL)
            return worker_id, stats
    raise AssertionError("no decode worker was running a request")


def test_killed_decode_worker_streams_migrate_with_undisturbed_text(cluster, e2e_model_dir):
    prompts = [f"{i} {LONG}" for i in range(STREAMS)]
    expected = undisturbed_text(e2e_model_dir, prompts)
    started = time.monotonic()
    with httpx.Client(timeout=60) as http:
        streams = [http.stream("POST", f"{cluster.url}/v1/completions", json={
            "model": cluster.model_name, "prompt": prompt, "max_tokens": MAX_TOKENS, "stream": True,
            "temperature": 0, "ignore_eos": True}) for prompt in prompts]
        responses = [s.__enter__() for s in streams]
        lines = [r.iter_lines() for r in responses]
        heads = [[next(it)] for it in lines]  # every stream has streamed a token
        workers = {w.worker_id: w for w in cluster.workers()}
        victim, at_kill = _kill_a_busy_decode_worker(workers)
        # The tokens of its running requests are at most all it generated, read just before the kill.
        left = int(at_kill["num_requests_running"]) * MAX_TOKENS - int(at_kill["generation_tokens_total"])
        assert left >= LEFT_AT_KILL, at_kill
        texts = [_text_of(head + [line for line in it if line]) for head, it in zip(heads, lines)]
        for s in streams:
            s.__exit__(None, None, None)
        assert texts == expected, "every stream, migrated or not, reads as an undisturbed greedy run"
        assert time.monotonic() - started < 60
        metrics = http.get(f"{cluster.url}/metrics").text
        migrated = next(float(line.split()[-1]) for line in metrics.splitlines()
                        if line.startswith("baton_router_migrations_total"))
        assert migrated >= 1
    survivors = set(workers) - {victim}
    settled = _settled(cluster, survivors)
    assert set(settled) == survivors
    for worker, s in settled.items():
        assert int(s["num_requests_running"]) == 0 and int(s["kv_blocks_used"]) == 0, (worker, s)
