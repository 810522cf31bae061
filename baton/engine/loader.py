"""Loads a Hugging Face-format directory (config.json + safetensors, single or sharded) into CausalLM."""
from __future__ import annotations

import json
import pathlib
import re

import torch
from safetensors import safe_open
from tqdm import tqdm

from baton.engine.config import EngineConfig, ModelConfig
from baton.engine.errors import ModelFilesError
from baton.engine.model import CausalLM, rope_inv_freq


def weight_files(model_dir: pathlib.Path) -> list[pathlib.Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelFilesError(f"{index}: field 'weight_map' is missing or invalid ({exc})") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelFilesError(f"{index}: lists shard(s) that do not exist: {', '.join(missing)}")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(model_dir.glob("*.safetensors"))
    if found:
        return found
    raise ModelFilesError(f"{model_dir}: no model.safetensors, model.safetensors.index.json or *.safetensors file")


def load_model(config: EngineConfig, model_config: ModelConfig | None = None) -> CausalLM:
    """Builds the model on the target device and copies every checkpoint tensor in, checking names and shapes."""
    model_dir = pathlib.Path(config.model_dir)
    mc = model_config or ModelConfig.from_dir(model_dir)
    dtype = config.resolve_dtype(mc)
    with torch.device("meta"):
        model = CausalLM(mc)
    model = model.to_empty(device=config.device).to(dtype)
    # Buffers were made on the meta device; RoPE frequencies stay float32 as in the reference.
    model.rotary.inv_freq = rope_inv_freq(mc.rope, mc.head_dim).to(config.device)
    model.rotary.reset_tables()
    # Per-layer K and V scales of an FP8 KV cache: float32, 1.0 (vLLM's default) unless the checkpoint has them.
    kv_scales = torch.ones(mc.num_layers, 2, dtype=torch.float32, device=config.device)
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.kv_scale = kv_scales[i]
    model.kv_scales = kv_scales
    if config.load_format == "dummy":
        return _quantized(_random_weights(model, config.seed), config)
    files = weight_files(model_dir)
    if _fp8_checkpoint(model_dir):
        _swap_in_fp8_modules(model, files, mc)
    params = dict(model.named_parameters())
    params.update(_fp8_tensors(model))
    expected = {_scale_name(target, to_checkpoint=True)
                for name in params for target in _checkpoint_names(name, params[name], mc)}
    seen: set[str] = set()
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            total += len(list(f.keys()))
    with tqdm(total=total, desc="Loading weights", unit="tensor", disable=not config.show_progress, leave=False) as bar:
        for path in files:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    bar.update(1)
                    if name == "lm_head.weight" and mc.tie_embeddings:
                        continue
                    if name.endswith(("rotary_emb.inv_freq", ".input_scale")):
                        continue  # FP8 activations are scaled per token on the fly, not by a static input_scale
                    kv_scale = _KV_SCALE_NAME.fullmatch(name)
                    if kv_scale is not None:
                        _load_kv_scale(kv_scales, kv_scale, f.get_tensor(name), path.name, mc)
                        model.kv_scales_from_checkpoint = True
                        continue
                    target = _param_slice(_scale_name(name, to_checkpoint=False), params, mc)
                    if target is None:
                        raise ModelFilesError(f"{path.name}: unexpected tensor '{name}' for {mc.arch}")
                    tensor = f.get_tensor(name)
                    if name.endswith(".weight_scale"):  # [N, 1] per channel or one per tensor -> [N]
                        tensor = tensor.float().reshape(-1)
                        if tensor.numel() == 1:
                            tensor = tensor.expand(target.shape)
                    if tuple(tensor.shape) != tuple(target.shape):
                        raise ModelFilesError(
                            f"{path.name}: tensor '{name}' has shape {tuple(tensor.shape)}, "
                            f"config.json implies {tuple(target.shape)}"
                        )
                    with torch.no_grad():
                        target.copy_(tensor)
                    seen.add(name)
    missing = sorted(expected - seen)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ModelFilesError(f"{model_dir}: checkpoint lacks {len(missing)} tensor(s): {shown}")
    return _quantized(model.eval(), config)


# KV-cache scales as vLLM / compressed-tensors / llm-compressor checkpoints name them (kv_scale: one for both).
_KV_SCALE_NAME = re.compile(r"model\.layers\.(\d+)\.self_attn\.(?:attn\.)?"
                            r"(k_scale|v_scale|kv_scale|k_proj\.output_scale|v_proj\.output_scale)")


def _load_kv_scale(kv_scales: torch.Tensor, match: re.Match, tensor: torch.Tensor, file: str,
                   mc: ModelConfig) -> None:
    layer, kind = int(match.group(1)), match.group(2)
    if not layer < mc.num_layers:
        raise ModelFilesError(f"{file}: unexpected tensor '{match.group(0)}': the model has {mc.num_layers} layers")
    if tensor.numel() != 1 or not (tensor.float() > 0).all() or not tensor.float().isfinite().all():
        raise ModelFilesError(f"{file}: tensor '{match.group(0)}' must be one positive finite number, got "
                              f"shape {tuple(tensor.shape)}")
    columns = {"k": [0], "v": [1], "kv": [0, 1]}[kind.split("_")[0]]
    kv_scales[layer, columns] = tensor.float().reshape(()).to(kv_scales.device)


def _quantized(model: CausalLM, config: EngineConfig) -> CausalLM:
    from baton.engine.quantization import Fp8Linear

    if config.quantization == "fp8":
        from baton.engine.quantization import quantize_fp8_, quantize_lm_head_fp8_

        quantize_fp8_(model, all_layers=config.fp8_all_layers)
        if config.fp8_lm_head:
            quantize_lm_head_fp8_(model)
    if config.fp8_weight_only:  # quantized here or FP8 in the checkpoint
        fp8 = [m for m in model.modules() if isinstance(m, Fp8Linear)]
        if not fp8:
            raise ValueError("fp8_weight_only: the model has no FP8 layers (quantize with --quantization fp8, or "
                             "load an FP8 checkpoint)")
        for module in fp8:
            module.weight_only = True
    return model


def _fp8_checkpoint(model_dir: pathlib.Path) -> bool:
    import json

    from baton.engine.quantization import checkpoint_fp8

    path = model_dir / "config.json"
    return checkpoint_fp8(json.loads(path.read_text()), str(path))


def _swap_in_fp8_modules(model: CausalLM, files: list[pathlib.Path], mc: ModelConfig) -> None:
    """Replaces every projection whose checkpoint tensors carry a weight_scale with an Fp8Linear (filled from
    the checkpoint next, as it is: no re-quantization); the parts of a merged projection must agree."""
    from baton.engine.quantization import quantize_fp8_

    scaled: set[str] = set()
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            scaled |= {k[: -len(".weight_scale")] for k in f.keys() if k.endswith(".weight_scale")}
    modules: set[str] = set()
    for merged, parts in {**_MERGED, "o_proj": ("o_proj",), "down_proj": ("down_proj",)}.items():
        for i in range(mc.num_layers):
            owner = "self_attn" if merged in ("qkv_proj", "o_proj") else "mlp"
            names = [f"model.layers.{i}.{owner}.{part}" for part in parts]
            have = [n in scaled for n in names]
            if any(have) and not all(have):
                raise ModelFilesError(f"{files[0].parent}: {', '.join(names)} must be all FP8 or none "
                                      f"(they are merged into one {merged}); FP8: {have}")
            if all(have):
                modules.add(f"model.layers.{i}.{owner}.{merged}")
    quantize_fp8_(model, only=modules)


def _fp8_tensors(model: CausalLM) -> dict[str, torch.Tensor]:
    from baton.engine.quantization import Fp8Linear

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, Fp8Linear):
            out |= {f"{name}.{b}": t for b, t in module.named_buffers() if t is not None}
    return out


def _scale_name(name: str, to_checkpoint: bool) -> str:
    """Fp8Linear's `scale` is the checkpoint's `weight_scale`."""
    if to_checkpoint and name.endswith(".scale"):
        return name[: -len("scale")] + "weight_scale"
    if not to_checkpoint and name.endswith(".weight_scale"):
        return name[: -len("weight_scale")] + "scale"
    return name


# Merged parameters and the checkpoint tensors that fill their row blocks, in order.
_MERGED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _row_sizes(merged: str, mc: ModelConfig) -> tuple[int, ...]:
    if merged == "qkv_proj":
        kv = mc.num_kv_heads * mc.head_dim
        return mc.num_heads * mc.head_dim, kv, kv
    return mc.intermediate_size, mc.intermediate_size


def _checkpoint_names(param_name: str, param: torch.Tensor, mc: ModelConfig) -> list[str]:
    """The checkpoint tensor names that fill one model parameter."""
    for merged, parts in _MERGED.items():
        if f".{merged}." in param_name:
            return [param_name.replace(merged, part) for part in parts]
    if param_name == "lm_head.weight" and mc.tie_embeddings:
        return []
    return [param_name]


def _param_slice(name: str, params: dict[str, torch.Tensor], mc: ModelConfig) -> torch.Tensor | None:
    """The model tensor (or the row block of a merged one) that checkpoint tensor `name` fills."""
    for merged, parts in _MERGED.items():
        for i, part in enumerate(parts):
            if f".{part}." in name:
                param = params.get(name.replace(part, merged))
                if param is None:
                    return None
                sizes = _row_sizes(merged, mc)
                return param.narrow(0, sum(sizes[:i]), sizes[i])
    return params.get(name)


@torch.no_grad()
def _random_weights(model: CausalLM, seed: int) -> CausalLM:
    """Small random weights (norms at 1), made on the model's device: a real checkpoint's shapes without its files."""
    gen = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=gen)
    return model.eval()
