from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_close, needs_cuda, poisoned

from baton.kernels.gemv import (CONFIGS, CONFIGS_FP8, CONFIGS_FP8_BITS, CONFIGS_FP8_P, CONFIGS_FP8_P_SILU, CONFIGS_P,
                                CONFIGS_P_SILU, MMA_CONFIGS, MMA_CONFIGS_FP8, gemv, gemv_reference, pick_config)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("silu_mul", [False, True])
@pytest.mark.parametrize("n,k,config", [(24, 64, (8, 32, 4)), (21, 80, (8, 32, 4)), (16, 48, (4, 16, 2))])
def test_gemv_matches_reference(device, m, silu_mul, n, k, config):
    """Even and ragged shapes (masks), every row count, with and without the fused activation."""
    weight = torch.randn(n, k, device=device)
    x = torch.randn(m, 2 * k if silu_mul else k, device=device)
    out = poisoned(m, n, dtype=torch.float32, device=device)
    gemv(x, weight, silu_mul=silu_mul, config=config, out=out)
    assert_close(out, gemv_reference(x, weight, silu_mul=silu_mul))


@pytest.mark.parametrize("m", [2, 5, 8])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("one_row", [False, True])
def test_a_row_gets_its_one_row_result_bit_for_bit_in_any_row_count(device, m, fp8, one_row):
    """Row-invariant verification rests on this: with one config, every row of an m-row call (programs of 2 or 4
    rows, a second group above 4; or "r1", a program per row) equals a one-row call on that row exactly; bf16 and
    FP8 weights, ragged shape, fused activation and bias."""
    from baton.engine.quantization import Fp8Linear

    n, k = 21, 80
    lin = torch.nn.Linear(k, n, device=device)
    weight, scale = (lin.weight.detach(), None) if not fp8 else (Fp8Linear.quantize(lin).weight, Fp8Linear.quantize(lin).scale)
    bias = lin.bias.detach().to(torch.bfloat16)
    x = torch.randn(m, 2 * k, device=device).to(torch.bfloat16)
    weight = weight if fp8 else weight.to(torch.bfloat16)
    config = ((8, 32, 4, "cvt") if fp8 else (8, 32, 4)) + (("r1",) if one_row else ())
    rows = gemv(x, weight, bias, silu_mul=True, config=config, scale=scale)
    for i in range(m):
        assert torch.equal(rows[i:i + 1], gemv(x[i:i + 1], weight, bias, silu_mul=True, config=config, scale=scale))
    assert_close(rows, gemv_reference(x, weight, bias, silu_mul=True, scale=scale))


def test_alike_tiles_fit_four_rows_in_registers():
    from baton.kernels.gemv import ALIKE_TILES, ROWS_PER_PROGRAM

    assert len(ALIKE_TILES) >= 6
    for block_n, block_k, warps in ALIKE_TILES:
        assert ROWS_PER_PROGRAM * block_n * block_k // (32 * warps) <= 64  # fp32 accumulator registers a thread


def test_gemv_bias_and_strided_rows(device):
    """A bias (qkv of Qwen2) and an x whose rows are a view with a row stride larger than K."""
    weight, bias = torch.randn(32, 64, device=device), torch.randn(32, device=device)
    wide = torch.randn(2, 100, device=device)
    x = wide[:, :64]
    assert_close(gemv(x, weight, bias, config=(8, 32, 4)), gemv_reference(x, weight, bias))


def test_gemv_bf16_rounds_the_fused_activation_like_the_separate_kernel(device):
    """In bf16, silu(gate) * up is rounded to bf16 before the dot product, as the unfused path stores it."""
    from baton.kernels.silu_mul import silu_mul

    weight = torch.randn(16, 64, device=device).to(torch.bfloat16)
    x = torch.randn(1, 128, device=device).to(torch.bfloat16)
    fused = gemv(x, weight, silu_mul=True, config=(8, 32, 4))
    separate = gemv(silu_mul(x, block=16), weight, config=(8, 32, 4))
    assert_close(fused, separate)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("n,k,silu", [(6144, 4096, False), (4096, 4096, False), (28672, 4096, False),
                                      (4096, 14336, True), (128256, 4096, False)])
@pytest.mark.parametrize("m", [1, 4, 8])
def test_llama3_8b_projections(m, n, k, silu):
    weight = (torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16)
    x = torch.randn(m, 2 * k if silu else k, device="cuda").to(torch.bfloat16)
    for config in CONFIGS + CONFIGS_P + MMA_CONFIGS + (CONFIGS_P_SILU if silu else ()):
        assert_close(gemv(x, weight, silu_mul=silu, config=config), gemv_reference(x, weight, silu_mul=silu))
    pick_config(m, weight, None, silu)  # runs: returns a config or None (cuBLAS)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("n,k,silu", [(960, 576, False), (576, 1536, True), (6144, 4096, False)])
def test_mma_and_one_row_configs_round_each_row_as_a_one_row_call_on_the_gpu(fp8, n, k, silu):
    """At SmolLM2 and Llama-3-8B shapes: every tensor-core config and every gemv config run a program per row ("r1")
    give each row of an 8-row call the one-row call's result bit for bit (what row-invariant verification relies on),
    and the reference's answer."""
    from baton.engine.quantization import Fp8Linear

    lin = torch.nn.Linear(k, n, device="cuda")
    q = Fp8Linear.quantize(lin)
    weight, scale = (q.weight, q.scale) if fp8 else (lin.weight.detach().to(torch.bfloat16), None)
    bias = lin.bias.detach().to(torch.bfloat16)
    x = torch.randn(8, 2 * k if silu else k, device="cuda").to(torch.bfloat16)
    one_row = tuple((*c, *(("cvt",) if fp8 else ()), "r1") for c in CONFIGS)
    for config in (MMA_CONFIGS_FP8 if fp8 else MMA_CONFIGS) + one_row:
        rows = gemv(x, weight, bias, silu_mul=silu, config=config, scale=scale)
        assert_close(rows, gemv_reference(x, weight, bias, silu_mul=silu, scale=scale))
        for i in range(8):
            one = gemv(x[i:i + 1].clone(), weight, bias, silu_mul=silu, config=config, scale=scale)
            assert torch.equal(rows[i:i + 1], one), (config, i)


@pytest.mark.parametrize("silu_mul", [False, True])
def test_fp8_row_quantization_matches_reference(device, silu_mul):
    from baton.kernels.fp8_quant import quantize_rows, quantize_rows_reference

    x = 3 * torch.randn(5, 96 if silu_mul else 48, device=device)
    x[2] *= 100  # a loud row keeps its own scale
    q, scale = quantize_rows(x, silu_mul=silu_mul)
    q_ref, scale_ref = quantize_rows_reference(x, silu_mul=silu_mul)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    if device == "cpu":
        return  # Triton's interpreter casts float32 to e4m3 wrongly (124.7 -> 64): the values are checked on the GPU
    ref = q_ref.float()
    ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp(min=2 ** -6))) - 3)
    assert ((q.float() - ref).abs() <= ulp).all()
    assert (q.float() - ref).abs().sum() < 0.05 * ref.abs().sum()


def test_fp8_gemv_matches_dequantized_reference(device):
    from baton.engine.quantization import Fp8Linear

    lin = torch.nn.Linear(64, 24, bias=True, device=device)
    q = Fp8Linear.quantize(lin)
    x = torch.randn(6, 64, device=device)  # two groups of rows
    out = gemv(x, q.weight, q.bias, config=(8, 32, 4), scale=q.scale)
    assert_close(out, gemv_reference(x, q.weight, q.bias, scale=q.scale))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("n,k,silu", [(6144, 4096, False), (4096, 14336, True)])
@pytest.mark.parametrize("m", [1, 4, 8])
def test_fp8_configs_at_llama3_8b_shapes(m, n, k, silu):
    """Every config pick_config may choose for FP8 weights (2048-wide ones, both e4m3 conversions) gives the reference's
    answer."""
    from baton.engine.quantization import Fp8Linear

    lin = torch.nn.Linear(k, n, bias=False, device="cuda")
    q = Fp8Linear.quantize(lin)
    x = torch.randn(m, 2 * k if silu else k, device="cuda").to(torch.bfloat16)
    expected = gemv_reference(x, q.weight, None, silu_mul=silu, scale=q.scale)
    separate = CONFIGS_FP8_P_SILU if silu else ()
    for config in CONFIGS_FP8 + CONFIGS_FP8_BITS + CONFIGS_FP8_P + MMA_CONFIGS_FP8 + separate:
        assert_close(gemv(x, q.weight, silu_mul=silu, config=config, scale=q.scale), expected)


def _e4m3_weight(n: int, k: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A quantized random weight and its scale, with the e4m3 corner values planted: +-0, subnormals, +-448."""
    from baton.engine.quantization import Fp8Linear

    q = Fp8Linear.quantize(torch.nn.Linear(k, n, bias=False, device=device))
    special = torch.tensor([0, 0x80, 0x01, 0x81, 0x07, 0x87, 0x7E, 0xFE, 0x08, 0x88], dtype=torch.uint8)
    w = q.weight.view(torch.uint8).flatten().clone()
    w[torch.randperm(w.numel())[: special.numel()].to(w.device)] = special.to(w.device)
    return w.view(torch.float8_e4m3fn).view(n, k), q.scale


def test_e4m3_bit_trick_gives_every_finite_value_times_2_pow_minus_120():
    """The FP8_BITS conversion in plain torch: an int8 e4m3 byte, sign-extended, shifted left 20 and masked with
    0x87F00000, read as float32, is exactly the e4m3 value * 2**-120 for all 254 finite bytes (subnormals too)."""
    byte = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    value = byte.view(torch.float8_e4m3fn).float()
    finite = ~value.isnan()
    assert int(finite.sum()) == 254
    bits = ((byte.view(torch.int8).to(torch.int32) << 20) & -0x78100000).view(torch.float32)
    torch.testing.assert_close(bits[finite], value[finite] * 2.0**-120, rtol=0, atol=0)
    assert torch.equal(bits[finite].signbit(), value[finite].signbit())  # -0.0 stays -0.0


@pytest.mark.parametrize("mode", ["cvt", "bits"])
def test_fp8_gemv_reads_every_e4m3_value_exactly(device, mode):
    """One-hot rows of x pick single weights: each of the 254 finite e4m3 values comes out exactly (8 rows, two
    row groups; N = 254 and K = 8 are ragged for the config)."""
    byte = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    values = byte[~byte.view(torch.float8_e4m3fn).float().isnan()]
    cols = torch.randint(0, 256, (254, 8), dtype=torch.int32).to(torch.uint8)
    cols[(cols & 0x7F) == 0x7F] = 0  # no NaN
    cols[:, 3] = values
    weight = cols.view(torch.float8_e4m3fn).to(device)
    x = torch.eye(8, device=device)
    out = gemv(x, weight, config=(8, 16, 4, mode), scale=torch.ones(254, device=device))
    assert torch.equal(out, weight.float().t())


@pytest.mark.parametrize("m", range(1, 9))
@pytest.mark.parametrize("silu_mul", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n,k,config", [(24, 64, (8, 32, 4)), (21, 80, (8, 32, 4))])
def test_fp8_bits_matches_reference_and_cvt(device, m, silu_mul, bias, n, k, config):
    """The integer e4m3 conversion against the dequantized reference, and bit for bit against the hardware
    conversion: its powers of two (w * 2**-120, x * 2**60, the sum * 2**60) are exact, so every rounding is the same."""
    weight, scale = _e4m3_weight(n, k, device)
    b = torch.randn(n, device=device) if bias else None
    x = torch.randn(m, 2 * k if silu_mul else k, device=device)
    out = poisoned(m, n, dtype=torch.float32, device=device)
    gemv(x, weight, b, silu_mul=silu_mul, config=(*config, "bits"), out=out, scale=scale)
    assert_close(out, gemv_reference(x, weight, b, silu_mul=silu_mul, scale=scale))
    assert torch.equal(out, gemv(x, weight, b, silu_mul=silu_mul, config=(*config, "cvt"), scale=scale))


def test_fp8_bits_bf16_activations(device):
    """As the engine runs it: bf16 x (the fused activation rounded to bf16 before the 2**60 gain), bf16 output."""
    weight, scale = _e4m3_weight(24, 64, device)
    x = torch.randn(3, 128, device=device).to(torch.bfloat16)
    out = gemv(x, weight, silu_mul=True, config=(8, 32, 4, "bits"), scale=scale)
    assert out.dtype == torch.bfloat16
    assert_close(out, gemv_reference(x, weight, silu_mul=True, scale=scale))
    assert torch.equal(out, gemv(x, weight, silu_mul=True, config=(8, 32, 4, "cvt"), scale=scale))


@pytest.mark.parametrize("m", [1, 3, 8, 16])
@pytest.mark.parametrize("n,k,config", [(48, 64, (16, 32, 4, "mma", 2)), (21, 80, (16, 32, 4, "mma", 2)),
                                         (40, 96, (32, 64, 4, "mma", 3))])
def test_mma_config_matches_reference(device, m, n, k, config):
    """The tensor-core kernel: even and ragged shapes (masked columns and K tail), 1 to 16 rows, fused activation,
    bias; no row past m is written."""
    weight = (torch.randn(n, k, device=device) / k**0.5).to(torch.bfloat16)
    bias = torch.randn(n, device=device).to(torch.bfloat16)
    x = torch.randn(m, 2 * k, device=device).to(torch.bfloat16)
    out = poisoned(m + 1, n, dtype=torch.bfloat16, device=device)
    gemv(x, weight, bias, silu_mul=True, config=config, out=out[:m])
    assert_close(out[:m], gemv_reference(x, weight, bias, silu_mul=True))
    assert out[m:].isnan().all()


@pytest.mark.parametrize("fp8", [False, True])
def test_mma_rows_equal_their_one_row_results_bit_for_bit(device, fp8):
    """Row-invariant verification with a tensor-core config: each row of a 2-, 5- or 8-row call equals the one-row
    call on that row exactly (bf16 and FP8 weights)."""
    from baton.engine.quantization import Fp8Linear

    n, k = 40, 96
    lin = torch.nn.Linear(k, n, device=device)
    q = Fp8Linear.quantize(lin)
    weight, scale = (q.weight, q.scale) if fp8 else (lin.weight.detach().to(torch.bfloat16), None)
    x = torch.randn(8, k, device=device).to(torch.bfloat16)
    config = (16, 32, 4, "mma", 2)
    for m in (2, 5, 8):
        rows = gemv(x[:m], weight, config=config, scale=scale)
        for i in range(m):
            assert torch.equal(rows[i:i + 1], gemv(x[i:i + 1], weight, config=config, scale=scale))
    assert_close(rows, gemv_reference(x, weight, scale=scale))


@pytest.mark.parametrize("fp8_mode", [None, "cvt", "bits"])
@pytest.mark.parametrize("n,k,config", [(24, 64, (8, 32, 4)), (21, 80, (8, 32, 4))])
def test_weight_prefetch_sums_the_same_as_without(device, fp8_mode, n, k, config):
    """The gemv kernel's weight prefetch (next tile's load issued before this tile's FMAs) changes when bytes are
    read, not the sums: bit-equal to the plain loop, even and ragged shapes (the last prefetch is masked out)."""
    from baton.engine.quantization import Fp8Linear

    lin = torch.nn.Linear(k, n, device=device)
    if fp8_mode:
        q = Fp8Linear.quantize(lin)
        weight, scale, config = q.weight, q.scale, (*config, fp8_mode)
    else:
        weight, scale = lin.weight.detach().to(torch.bfloat16), None
    x = torch.randn(5, 2 * k, device=device).to(torch.bfloat16)
    plain = gemv(x, weight, silu_mul=True, config=config, scale=scale, prefetch=False)
    ahead = gemv(x, weight, silu_mul=True, config=config, scale=scale, prefetch=True)
    assert torch.equal(plain, ahead)
    assert_close(ahead, gemv_reference(x, weight, silu_mul=True, scale=scale))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fp8", [False, True])
def test_pdl_launches_give_the_same_results_on_the_gpu(fp8):
    """Programmatic dependent launch (kernels/pdl.py) at Llama-3-8B shapes, right behind the kernel that writes x:
    the gemv and tensor-core kernels wait for it and give what they give without PDL, bit for bit."""
    from baton.engine.quantization import Fp8Linear
    from baton.kernels.silu_mul import silu_mul

    n, k = 4096, 14336
    lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    q = Fp8Linear.quantize(lin)
    weight, scale = (q.weight, q.scale) if fp8 else (lin.weight.detach(), None)
    source = torch.randn(4, 2 * k, device="cuda").to(torch.bfloat16)
    configs = (CONFIGS_FP8[:3] + MMA_CONFIGS_FP8[:2]) if fp8 else (CONFIGS[:3] + MMA_CONFIGS[:2])
    for config in configs:
        want = gemv(silu_mul(source), weight, config=config, scale=scale, pdl=False)
        for _ in range(3):
            x = silu_mul(source)  # written by the kernel just before: a PDL launch must wait for it
            got = gemv(x, weight, config=config, scale=scale, pdl=True)
            assert torch.equal(got, want), config


@pytest.mark.parametrize("m", [1, 3, 6])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("silu_mul", [False, True])
def test_partial_sum_configs_match_reference_and_keep_rows_alike(device, m, fp8, silu_mul):
    """Configs flagged "p" (in-register partial sums over each 16-byte weight load): the reference's answer on even
    and ragged shapes, and each row of an m-row call bit-equal to its one-row call (also run a program per row, and
    with SwiGLU from its own kernel first, "s")."""
    from baton.engine.quantization import Fp8Linear

    for n, k in ((24, 128), (21, 160)):
        lin = torch.nn.Linear(k, n, device=device)
        q = Fp8Linear.quantize(lin)
        weight, scale = (q.weight, q.scale) if fp8 else (lin.weight.detach().to(torch.bfloat16), None)
        bias = lin.bias.detach().to(torch.bfloat16)
        x = torch.randn(m, 2 * k if silu_mul else k, device=device).to(torch.bfloat16)
        for config in ((8, 64, 4, "cvt", "p"), (4, 128, 4, "cvt", "p", "r1"), (8, 64, 4, "cvt", "p", "s")) if fp8 \
                else ((8, 64, 4, "p"), (4, 128, 4, "p", "r1"), (8, 64, 4, "p", "s")):
            rows = gemv(x, weight, bias, silu_mul=silu_mul, config=config, scale=scale)
            assert_close(rows, gemv_reference(x, weight, bias, silu_mul=silu_mul, scale=scale))
            for i in range(m):
                one = gemv(x[i:i + 1], weight, bias, silu_mul=silu_mul, config=config, scale=scale)
                assert torch.equal(rows[i:i + 1], one), (config, i)



def test_timed_plans_are_kept_on_disk_per_machine(tmp_path, monkeypatch):
    """A worker's next start reuses the configs its last one timed (cuBLAS answers, None, too); another key is
    timed anew; BATON_GEMV_PLAN_CACHE=0 times every time and writes nothing."""
    from baton.kernels.gemv import cached_plan, plan_cache_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []

    def pick(answer):
        return lambda: calls.append(answer) or answer

    assert cached_plan(("dense", 1, 960, 576), pick((4, 1024, 4, "p"))) == (4, 1024, 4, "p")
    assert cached_plan(("dense", 1, 960, 576), pick((8, 512, 8))) == (4, 1024, 4, "p")  # from the file
    assert cached_plan(("dense", 8, 960, 576), pick(None)) is None
    assert cached_plan(("dense", 8, 960, 576), pick((2, 1024, 4))) is None
    assert calls == [(4, 1024, 4, "p"), None] and plan_cache_path().is_file()
    monkeypatch.setenv("BATON_GEMV_PLAN_CACHE", "0")
    assert cached_plan(("dense", 1, 960, 576), pick((8, 512, 8))) == (8, 512, 8)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other"))
    assert cached_plan(("dense", 2, 1, 1), pick((2, 512, 4))) == (2, 512, 4)
    assert not plan_cache_path().exists()
