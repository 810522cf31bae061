"""Compiles the decode kernels for Hopper (sm_90) without a GPU and prints, as JSON, what their code shows (run by
test_sm90_compile.py in a process of its own: the kernel tests' process runs Triton's CPU interpreter, which cannot
compile). Triton specializes pointers and sizes divisible by 16 at launch; the compiles below say so, as such a
launch would."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from baton.kernels import gemv as gemv_module

HOPPER = GPUTarget("cuda", 90, 32)
ALIGNED = ("x_ptr", "w_ptr", "s_ptr", "b_ptr", "out_ptr", "N", "K", "stride_xm", "stride_wn", "stride_om")
ARGS = {"x_ptr": "*bf16", "s_ptr": "*fp32", "b_ptr": "*bf16", "out_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
        "stride_xm": "i32", "stride_wn": "i32", "stride_om": "i32"}
NVDISASM = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")


def compile_for_hopper(fn, weight: str, constexprs: dict, **options):
    signature = {**ARGS, "w_ptr": weight, **{name: "constexpr" for name in constexprs}}
    signature = {name: signature[name] for name in fn.arg_names}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in ALIGNED}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=HOPPER, options=options)


def sass(kernel) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        return subprocess.run([NVDISASM, "-c", cubin.name], capture_output=True, text=True, check=True).stdout


def registers(kernel) -> int:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", cubin.name], capture_output=True, text=True, check=True)
    return int(re.search(r"REG:(\d+)", usage.stdout).group(1))


def loop_barriers(code: str) -> int:
    """Barriers inside the kernel's K loop: between a label and the branch back to it."""
    lines = code.splitlines()
    for end, line in enumerate(lines):
        back = re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)
        if back:
            start = next((i for i in range(end) if lines[i].strip().startswith(back.group(1) + ":")), None)
            if start is not None:
                return sum("BAR.SYNC" in ln for ln in lines[start:end])
    raise AssertionError("no loop found")


def facts() -> dict:
    out = {}
    for weight in ("*bf16", "*fp8e4nv"):
        for prefetch, pdl in ((False, False), (True, False), (True, True)):
            consts = dict(BLOCK_M=1, BLOCK_N=8, BLOCK_K=1024, EVEN=True, SILU_MUL=True, HAS_BIAS=False,
                          HAS_SCALE=weight != "*bf16", FP8_BITS=False, PREFETCH=prefetch, PDL=pdl, V=1)
            kernel = compile_for_hopper(gemv_module._gemv_kernel, weight, consts, num_warps=8, launch_pdl=pdl)
            ptx, code = kernel.asm["ptx"], sass(kernel)
            out[f"gemv {weight} prefetch={prefetch} pdl={pdl}"] = {
                "ldg128": "LDG.E.128" in code, "byte_loads": bool(re.search(r"\bLDG\.E\.U8\b", code)),
                "griddepcontrol": ptx.count("griddepcontrol"),
                "load_before_wait": pdl and ptx.index("ld.global") < ptx.index("griddepcontrol.wait")}
        for v, silu in ((1, False), (16 // (1 if "fp8" in weight else 2), False), (1, True)):
            consts = dict(BLOCK_M=1, BLOCK_N=4, BLOCK_K=2048, EVEN=True, SILU_MUL=silu, HAS_BIAS=False,
                          HAS_SCALE=weight != "*bf16", FP8_BITS=False, PREFETCH=False, PDL=False, V=v)
            kernel = compile_for_hopper(gemv_module._gemv_kernel, weight, consts, num_warps=4)
            out[f"gemv {weight} (4, 2048, 4) V={v} silu={silu}"] = {
                "registers": registers(kernel), "loop_barriers": loop_barriers(sass(kernel))}
        for block_n in (32, 64):
            consts = dict(BLOCK_N=block_n, BLOCK_K=256, EVEN=True, HAS_BIAS=False, HAS_SCALE=weight != "*bf16",
                          DOT_F32=False, PDL=True)
            kernel = compile_for_hopper(gemv_module._mma_kernel, weight, consts, num_warps=4, num_stages=3,
                                        launch_pdl=True)
            out[f"mma {weight} block_n={block_n}"] = {
                "async_copies": "ttg.async_copy_global_to_local" in kernel.asm["ttgir"],
                "mma": bool(re.search(r"\b(mma|wgmma)\.", kernel.asm["ptx"])),
                "griddepcontrol": kernel.asm["ptx"].count("griddepcontrol")}
    return out


if __name__ == "__main__":
    json.dump(facts(), sys.stdout)
