"""FP8 weights (`--quantization fp8`): quantization error bounds, which layers stay in the model dtype, the
engine end to end on the CPU (dequantized path), and the GPU kernels (gemv, _scaled_mm) against the reference."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from baton.engine.config import EngineConfig
from baton.engine.llm_engine import LLMEngine
from baton.engine.quantization import FP8, Fp8Linear
from baton.engine.sampling_params import SamplingParams
from tests.engine.checkpoints import make_hf_checkpoint


def test_per_channel_quantization_error_is_bounded():
    torch.manual_seed(0)
    lin = nn.Linear(256, 96, bias=True)
    with torch.no_grad():
        lin.weight[3] *= 50  # one loud channel must not cost the others their precision (per-channel scales)
    q = Fp8Linear.quantize(lin)
    assert q.weight.dtype == FP8 and q.scale.shape == (96,)
    w = lin.weight.detach()
    err = (q.dequantized(torch.float32) - w).abs() / w.abs().amax(dim=1, keepdim=True)
    assert err.max() <= 2 ** -4 + 1e-6  # e4m3: 3 mantissa bits, relative to the channel's absmax
    x = torch.randn(5, 256)
    ref, out = lin(x), q(x)
    assert torch.nn.functional.cosine_similarity(out, ref, dim=-1).min() > 0.999
    assert torch.allclose(q(x[:1]), out[:1], atol=1e-5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_hf_checkpoint(tmp_path_factory.mktemp("fp8") / "llama", "llama", seed=5, layers=4,
                                  max_position=512))


def test_first_and_last_layers_stay_in_the_model_dtype(model_dir):
    engine = LLMEngine(EngineConfig(model_dir, num_kv_blocks=64, quantization="fp8", show_progress=False))
    kinds = [type(layer.mlp.down_proj).__name__ for layer in engine.model.model.layers]
    assert kinds == ["Linear", "Fp8Linear", "Fp8Linear", "Linear"]
    assert isinstance(engine.model.model.layers[1].self_attn.qkv_proj, Fp8Linear)
    every = LLMEngine(EngineConfig(model_dir, num_kv_blocks=64, quantization="fp8", fp8_all_layers=True,
                                   show_progress=False))
    assert all(isinstance(layer.mlp.gate_up_proj, Fp8Linear) for layer in every.model.model.layers)
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(model_dir, quantization="int3")


@pytest.mark.parametrize("tied", [False, True])
def test_fp8_lm_head_quantizes_the_head_and_scores_text_like_the_model_dtype(tmp_path, tied):
    """fp8_lm_head: the head (a tied one: an FP8 copy beside the embedding, which stays) is FP8, and teacher-forced
    logprobs stay close to the model dtype's."""
    model_dir = str(make_hf_checkpoint(tmp_path / "m", "llama", seed=6, layers=2, max_position=256,
                                       tie=tied))
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    prompt = [7, 19, 23, 101, 5, 77] * 6 + list(range(30, 70))
    scores = []
    for variant in ({}, {"quantization": "fp8", "fp8_lm_head": True}):
        engine = LLMEngine(EngineConfig(model_dir, num_kv_blocks=64, show_progress=False, **variant))
        if variant:
            assert isinstance(engine.model.fp8_head, Fp8Linear) and engine.model.lm_head is None
            assert engine.model.model.embed_tokens.weight.dtype != torch.float8_e4m3fn
        engine.add_request("r", prompt, params)
        outs = [o for _ in range(8) for o in engine.step()]
        scores.append(torch.tensor(outs[0].prompt_logprobs))
    base, fp8 = scores
    assert (fp8 - base).abs().mean() < 0.02 * base.abs().mean(), (base, fp8)
    assert not torch.equal(fp8, base)
    with pytest.raises(ValueError, match="fp8_lm_head"):
        EngineConfig(model_dir, fp8_lm_head=True)


def test_fp8_weight_only_marks_every_fp8_layer_and_needs_some(model_dir):
    engine = LLMEngine(EngineConfig(model_dir, num_kv_blocks=64, quantization="fp8", fp8_weight_only=True,
                                    show_progress=False))
    fp8 = [m for m in engine.model.modules() if isinstance(m, Fp8Linear)]
    assert fp8 and all(m.weight_only for m in fp8)
    with pytest.raises(ValueError, match="fp8_weight_only: the model has no FP8 layers"):
        LLMEngine(EngineConfig(model_dir, num_kv_blocks=64, fp8_weight_only=True, show_progress=False))


def _llama_projection_case(m: int, silu: bool):
    """An FP8 Llama-3-8B qkv-sized layer on the GPU, m bf16 input rows (gate || up with silu) and the float32
    product of the activation with the dequantized weight."""
    torch.manual_seed(m)
    q = Fp8Linear.quantize(nn.Linear(4096, 6144, bias=False, device="cuda", dtype=torch.bfloat16))
    x = torch.randn(m, 2 * 4096 if silu else 4096, device="cuda").to(torch.bfloat16)
    h = x
    if silu:
        gate, up = x.float().chunk(2, dim=-1)
        h = (torch.nn.functional.silu(gate) * up).to(torch.bfloat16)
    return q, x, h.float() @ q.dequantized(torch.float32).t()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("m", [16, 300])
@pytest.mark.parametrize("silu", [False, True])
def test_fp8_weight_only_linear_on_the_gpu_is_exact_up_to_rounding(m, silu):
    """fp8_weight_only: steps above the gemv's rows keep bf16 activations (kernels/fp8_gemm.py), so the result is
    the dequantized reference up to bf16 rounding, tighter than per-token FP8 activations allow."""
    q, x, ref = _llama_projection_case(m, silu)
    q.weight_only = True
    out = q(x, silu_mul=silu).float()
    assert ((out - ref).norm(dim=-1) / ref.norm(dim=-1)).max() < 0.01


def test_fp8_engine_scores_text_like_the_model_dtype(model_dir):
    """Teacher-forced: the log-probability of every prompt token moves little under FP8 (greedy agreement of a
    random tiny model says nothing: its logits are nearly flat)."""
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    prompt = [7, 19, 23, 101, 5, 77] * 6 + list(range(30, 70))
    scores = []
    for quantization in (None, "fp8"):
        engine = LLMEngine(EngineConfig(model_dir, num_kv_blocks=64, quantization=quantization, fp8_all_layers=True,
                                        show_progress=False))
        engine.add_request("r", prompt, params)
        outs = [o for _ in range(8) for o in engine.step()]
        scores.append(torch.tensor(outs[0].prompt_logprobs))
        assert engine.stats().blocks.in_use == 0
    base, fp8 = scores
    assert (fp8 - base).abs().mean() < 0.02 * base.abs().mean(), (base, fp8)
    assert not torch.equal(fp8, base)  # the weights really changed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("m", [1, 3, 8, 64])
@pytest.mark.parametrize("silu", [False, True])
def test_fp8_linear_on_the_gpu_matches_the_dequantized_reference(m, silu):
    q, x, ref = _llama_projection_case(m, silu)
    out = q(x, silu_mul=silu).float()
    # gemv is exact up to float rounding; _scaled_mm also quantizes the activations per token. Which one a shape
    # uses at m <= 8 is timed once per (rows bucket, silu, shape) and shared (q.plan; None: _scaled_mm was faster).
    used_gemv = q.plan(m, silu) is not None
    tol = 0.02 if used_gemv else 0.08
    assert ((out - ref).norm(dim=-1) / ref.norm(dim=-1)).max() < tol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_layers_of_one_shape_share_one_timed_plan():
    """Start-up times each decode shape once, not once per layer: a second layer of the same shape finds the plan
    the first one's step timed."""
    first, x, _ = _llama_projection_case(1, False)
    second = Fp8Linear.quantize(torch.nn.Linear(x.shape[1], first.weight.shape[0], bias=False, device="cuda"))
    first(x)
    import baton.kernels.gemv as gemv_module

    calls = []
    real = gemv_module.pick_config
    gemv_module.pick_config = lambda *a, **k: calls.append(a) or real(*a, **k)
    try:
        second(x)
    finally:
        gemv_module.pick_config = real
    assert calls == [] and second.plan(1) == first.plan(1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp8_engine_on_the_gpu_with_cuda_graphs(model_dir):
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    engine = LLMEngine(EngineConfig(model_dir, device="cuda", dtype="bfloat16", num_kv_blocks=64, max_num_seqs=8,
                                    quantization="fp8", fp8_all_layers=True, show_progress=False))
    prompts = [[5 + i, 9, 13, 200, 7] * 4 for i in range(6)]
    out = [s.output_ids for s in engine.generate(prompts, params)]
    assert all(len(o) == 12 for o in out)
    alone = [engine.generate([p], params)[0].output_ids for p in prompts[:2]]
    assert alone == out[:2]  # batch 6 (graph bucket 8, _scaled_mm) vs batch 1 (gemv): same greedy tokens


def _compressed_tensors_checkpoint(src: str, dst, keep_bf16: tuple[str, ...]) -> None:
    """`src` rewritten as an FP8 compressed-tensors checkpoint: projections per-channel FP8 with [N, 1] scales,
    layer 0's down_proj with one per-tensor scale, the modules named in `keep_bf16` left as they are."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(f"{src}/model.safetensors")
    out = {}
    for name, t in tensors.items():
        module = name[: -len(".weight")]
        if name.endswith("proj.weight") and not module.endswith(keep_bf16):
            w = t.float()
            if module == "model.layers.0.mlp.down_proj":
                scale = (w.abs().max() / 448).reshape(1)
            else:
                scale = w.abs().amax(dim=1, keepdim=True) / 448
            out[name] = (w / scale.reshape(-1, 1) if scale.numel() > 1 else w / scale).to(FP8)
            out[f"{module}.weight_scale"] = scale.float()
            out[f"{module}.input_scale"] = torch.ones(1)  # static activation scale: Baton scales per token
        else:
            out[name] = t
    save_file(out, f"{dst}/model.safetensors")
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float",
                                                                         "strategy": "channel", "symmetric": True}}}}
    (dst / "config.json").write_text(json.dumps(config))


def test_loads_compressed_tensors_fp8_checkpoints_as_they_are(model_dir, tmp_path):
    from safetensors.torch import load_file

    dst = tmp_path / "fp8-ckpt"
    _compressed_tensors_checkpoint(model_dir, dst, keep_bf16=("layers.3.mlp.gate_proj", "layers.3.mlp.up_proj",
                                                              "layers.3.mlp.down_proj"))
    engine = LLMEngine(EngineConfig(str(dst), num_kv_blocks=64, show_progress=False))
    layers = engine.model.model.layers
    assert isinstance(layers[0].self_attn.qkv_proj, Fp8Linear) and isinstance(layers[0].mlp.down_proj, Fp8Linear)
    assert not isinstance(layers[3].mlp.gate_up_proj, Fp8Linear)  # left in the model dtype by the checkpoint
    ckpt = load_file(f"{dst}/model.safetensors")
    q = layers[2].self_attn.qkv_proj
    rows = ckpt["model.layers.2.self_attn.q_proj.weight"].shape[0]
    assert torch.equal(q.weight[:rows].cpu().view(torch.uint8),
                       ckpt["model.layers.2.self_attn.q_proj.weight"].view(torch.uint8))
    assert torch.equal(q.scale[rows:rows + 4].cpu(), ckpt["model.layers.2.self_attn.k_proj.weight_scale"][:4, 0])
    per_tensor = ckpt["model.layers.0.mlp.down_proj.weight_scale"]
    assert torch.equal(layers[0].mlp.down_proj.scale.cpu(), per_tensor.expand(layers[0].mlp.down_proj.scale.shape))
    # And it scores text like the unquantized checkpoint it came from.
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    prompt = [7, 19, 23, 101, 5, 77] * 6
    scores = []
    for e in (LLMEngine(EngineConfig(model_dir, num_kv_blocks=64, show_progress=False)), engine):
        e.add_request("r", prompt, params)
        scores.append(torch.tensor([o for _ in range(8) for o in e.step()][0].prompt_logprobs))
    assert (scores[1] - scores[0]).abs().mean() < 0.02 * scores[0].abs().mean()


def test_unsupported_quantization_configs_are_refused_by_name(model_dir, tmp_path):
    import json
    import shutil

    from baton.engine.errors import ModelFilesError

    dst = tmp_path / "awq"
    shutil.copytree(model_dir, dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFilesError, match="quant_method 'awq' is not supported"):
        LLMEngine(EngineConfig(str(dst), num_kv_blocks=64, show_progress=False))
