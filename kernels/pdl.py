"""Programmatic dependent launch (Hopper): a decode step is ~450 small kernels in a row, and each one's start waits
for the previous one to drain. With PDL a kernel launched with `launch_pdl=True` may start while its predecessor's
last programs still run: it reads what no earlier kernel writes (its weights) right away, then waits
(`wait_for_previous`) before it reads the predecessor's output or writes anything. A predecessor lets its
successor start once all of its programs have begun (`launch_dependents`); without that the successor starts
when the predecessor's programs exit.

A kernel launched with PDL must call `wait_for_previous` in every program before its first dependent read and
first store; a kernel that only calls `launch_dependents` changes nothing for a successor launched without PDL.
Off by default (BATON_PDL=1 turns it on): what it saves is measured by `bench/pdl.py` before it becomes the
default. Never under Triton's CPU interpreter (the instructions are inline PTX)."""
from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_on = os.environ.get("BATON_PDL", "0") == "1" and not _INTERPRETED


def pdl_enabled() -> bool:
    """Whether kernels launched from now on use PDL (read at each launch: a CUDA graph keeps what it captured)."""
    return _on


def set_pdl(on: bool) -> None:
    """For benchmarks comparing both in one process; CUDA graphs must be captured again to follow."""
    global _on
    _on = on and not _INTERPRETED


def launch_kwargs(pdl: bool | None = None) -> dict:
    """The launch options of a kernel that waits for its predecessor with wait_for_previous(PDL)."""
    on = _on if pdl is None else pdl
    return {"launch_pdl": True} if on else {}


@triton.jit
def launch_dependents(ON: tl.constexpr):
    if ON:
        gdc_launch_dependents()


@triton.jit
def wait_for_previous(ON: tl.constexpr):
    if ON:
        gdc_wait()
