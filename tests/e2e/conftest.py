"""A real local cluster (Redis, router, control plane, worker processes) started the way `baton up` does."""
from __future__ import annotations

import pathlib
import shutil

import pytest

from baton.devtools.local_cluster import LocalCluster, UpOptions
from tests.conftest import RedisServer, free_port


@pytest.fixture(scope="module")
def own_redis():
    """A Redis the module may stop and restart; the session's shared one must stay up for other tests."""
    server = RedisServer()
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def e2e_model_dir(tmp_path_factory) -> pathlib.Path:
    from baton.devtools.make_model import make_model

    return make_model(tmp_path_factory.mktemp("e2e") / "e2e-llama", arch="llama", layers=2, hidden=64, heads=4,
                      kv_heads=2, vocab=512, max_position=1024, seed=21)


def start_cluster(model_dir, tmp_path, **kw) -> LocalCluster:
    opts = UpOptions(model=model_dir, port=free_port(), grpc_port=free_port(), controlplane_port=free_port(),
                     run_dir=tmp_path, **{"num_kv_blocks": 512, **kw})
    cluster = LocalCluster(opts)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="module")
def cluster_1p1d(e2e_model_dir, tmp_path_factory):
    cluster = start_cluster(e2e_model_dir, tmp_path_factory.mktemp("up11"), prefill=1, decode=1,
                            local_prefill_threshold=24)
    yield cluster
    cluster.stop()
