"""The decode kernels compiled for Hopper (sm_90) here, without a GPU (sm90_compile.py, in a process of its own):
Triton's own ptxas builds the cubin, so a kernel that would not compile on the H200 fails here first, and the code
shows what the launch options ask for: programmatic dependent launch, 16-byte weight loads, shared-memory
pipelining."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parents[2]
NVDISASM = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
pytestmark = pytest.mark.skipif(not NVDISASM.exists(), reason="the triton wheel has no CUDA tools")


@pytest.fixture(scope="module")
def facts() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("sm90_compile.py"))], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


@pytest.mark.parametrize("weight", ["*bf16", "*fp8e4nv"])
@pytest.mark.parametrize("prefetch,pdl", [(False, False), (True, False), (True, True)])
def test_gemv_compiles_for_hopper_with_wide_weight_loads(facts, weight, prefetch, pdl):
    f = facts[f"gemv {weight} prefetch={prefetch} pdl={pdl}"]
    assert f["ldg128"] and not f["byte_loads"]  # 16-byte weight loads
    assert f["griddepcontrol"] == (2 if pdl else 0)  # the early launch and the wait, only when asked
    assert f["load_before_wait"] == pdl  # the first weight tile is requested before waiting for the previous kernel


@pytest.mark.parametrize("weight", ["*bf16", "*fp8e4nv"])
@pytest.mark.parametrize("block_n", [32, 64])
def test_tensor_core_gemm_pipelines_its_weights_through_shared_memory(facts, weight, block_n):
    f = facts[f"mma {weight} block_n={block_n}"]
    assert f["async_copies"] and f["mma"]  # cp.async stages feeding tensor-core MMAs, not loads into registers
    assert f["griddepcontrol"] == 2


@pytest.mark.parametrize("weight", ["*bf16", "*fp8e4nv"])
def test_gemv_loop_has_no_barrier_and_partial_sums_free_registers(facts, weight):
    """In "p" configs x is loaded straight into the weight tile's layout, so the K loop has no barrier, and the
    partial sums need well under half the registers, so an SM holds more programs and more weight bytes in flight."""
    v = 16 if weight == "*fp8e4nv" else 8
    plain = facts[f"gemv {weight} (4, 2048, 4) V=1 silu=False"]
    partial = facts[f"gemv {weight} (4, 2048, 4) V={v} silu=False"]
    assert partial["loop_barriers"] == 0
    assert partial["registers"] <= 64 < plain["registers"]
