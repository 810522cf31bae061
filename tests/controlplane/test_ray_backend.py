"""RayBackend on a real local Ray instance: named actors each own a real worker process."""
from __future__ import annotations

import os

import pytest

from tests.controlplane.conftest import sleeper

ray = pytest.importorskip("ray")


@pytest.mark.slow
def test_ray_actors_scale_up_and_down(tmp_path):
    from baton.controlplane.backends.ray import RayBackend

    ray.init(num_cpus=2, num_gpus=3, include_dashboard=False, namespace="baton-test", log_to_driver=False)
    try:
        backend = RayBackend(cluster="c1", argv=sleeper(tmp_path), region="r1", namespace="baton-test")
        assert backend.free_gpus([("m", "decode")]) is None  # actors that take no GPUs: the policy decides
        gpu = RayBackend(cluster="g1", argv=sleeper(tmp_path), region="r1", namespace="baton-test",
                         actor_options={"num_cpus": 0, "num_gpus": 1})
        gpu.set_replicas("m", "prefill", 2)
        assert gpu.get_replicas("m", "prefill").ready == 2
        # Ray's available GPUs (3 - 2) plus the 2 our replicas hold: 3 for these pools to use.
        assert gpu.free_gpus([("m", "prefill")]) == 3
        gpu.set_replicas("m", "prefill", 0)
        backend.set_replicas("m", "decode", 2)
        backend.set_replicas("m", "decode", 2)  # idempotent: named actors are reused
        assert backend.get_replicas("m", "decode").ready == 2
        pids = [ray.get(backend.actor("m", "decode", i).pid.remote()) for i in range(2)]
        for pid in pids:
            os.kill(pid, 0)  # the worker processes exist
        backend.set_replicas("m", "decode", 1)
        count = backend.get_replicas("m", "decode")
        assert (count.desired, count.ready) == (1, 1)
        with pytest.raises(ProcessLookupError):
            os.kill(pids[1], 0)  # the removed replica's process was stopped, not orphaned
        backend.set_replicas("m", "decode", 0)
        assert backend.get_replicas("m", "decode").desired == 0
    finally:
        ray.shutdown()
