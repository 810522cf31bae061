"""Embedding runtime: a Llama-family body without the LM head runs a packed batch of inputs in one forward (no KV
cache: each input attends causally over its own tokens only), then pools one vector per input (last token, mean
or CLS) and optionally L2-normalises it."""
from __future__ import annotations

import pathlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from baton.engine.config import SUPPORTED_ARCHITECTURES, EngineConfig, ModelConfig
from baton.engine.embedding_config import EmbeddingSpec, read_json
from baton.engine.errors import InvalidRequestError, ModelFilesError
from baton.engine.loader import _checkpoint_names, _param_slice, _random_weights, weight_files
from baton.engine.model import DecoderModel, Rotary, rope_inv_freq

# A bucket of inputs shares one padded attention call; padding may add at most this share of its real tokens.
BUCKET_PADDING = 0.25


@dataclass
class _Bucket:
    rows: torch.Tensor  # [b, width] int64: flat-batch token of each (input, position); padding repeats a real token
    valid: torch.Tensor  # [b * width] bool: which padded slots are real tokens
    targets: torch.Tensor  # [real tokens] int64: flat-batch index of each real slot, in padded order
    mask: torch.Tensor | None  # [b, 1, width, width] bool, None when every input has the full width


class PackedAttention:
    """The `batch` a decoder layer calls: no cache writes; attention per length bucket, causal within each input."""

    def __init__(self, lengths: list[int], device: torch.device, sliding_window: int | None) -> None:
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        self.buckets: list[_Bucket] = []
        group: list[int] = []
        for i in order:
            candidate = group + [i]
            padded = len(candidate) * lengths[i]
            if group and padded > (1 + BUCKET_PADDING) * sum(lengths[j] for j in candidate):
                self.buckets.append(self._bucket(group, lengths, starts, device, sliding_window))
                candidate = [i]
            group = candidate
        if group:
            self.buckets.append(self._bucket(group, lengths, starts, device, sliding_window))

    @staticmethod
    def _bucket(group: list[int], lengths: list[int], starts: list[int], device, window: int | None) -> _Bucket:
        width = max(lengths[i] for i in group)
        pos = torch.arange(width)
        lens = torch.tensor([lengths[i] for i in group])[:, None]
        valid = pos[None, :] < lens
        rows = torch.tensor([starts[i] for i in group])[:, None] + torch.minimum(pos[None, :], lens - 1)
        mask = None
        if not bool(valid.all()) or (window is not None and width > window):
            causal = pos[None, :] <= pos[:, None]  # [query, key]
            if window is not None:
                causal &= pos[None, :] > pos[:, None] - window
            mask = (causal[None] & valid[:, None, :])[:, None].to(device)
        return _Bucket(rows.to(device), valid.reshape(-1).to(device), rows[valid].to(device), mask)

    def write_kv(self, kv_cache, layer: int, k: torch.Tensor, v: torch.Tensor, kv_scale=None) -> None:
        """Nothing is kept: an embedding forward is the whole request."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache, layer: int,
               sliding_window: int | None, kv_scale=None) -> torch.Tensor:
        out = torch.empty_like(q)
        for b in self.buckets:
            n, width = b.rows.shape
            qb, kb, vb = (t[b.rows].transpose(1, 2) for t in (q, k, v))  # [n, heads, width, head_dim]
            o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=b.mask, is_causal=b.mask is None,
                                               enable_gqa=True)
            out[b.targets] = o.transpose(1, 2).reshape(n * width, *q.shape[1:])[b.valid]
        return out


class EmbeddingModel(nn.Module):
    """The decoder body of CausalLM (same parameter names) and its final norm; no LM head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.rotary = Rotary(config)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: PackedAttention) -> torch.Tensor:
        """Final hidden states [tokens, hidden] of the flat batch."""
        x = self.model.embed_tokens(input_ids)
        rope = self.rotary(positions, x.dtype)
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, residual, rope, None, batch)
        x, _ = self.model.norm(x, residual)
        return x


def embedding_model_config(model_dir: pathlib.Path) -> ModelConfig:
    """config.json of a causal LM or of its bare body (`Qwen3Model`, `LlamaModel`: what embedding checkpoints
    saved by sentence-transformers name)."""
    path = model_dir / "config.json"
    raw = read_json(path)
    bodies = {name.removesuffix("ForCausalLM") + "Model": name for name in SUPPORTED_ARCHITECTURES}
    raw["architectures"] = [bodies.get(a, a) for a in raw.get("architectures") or []]
    return ModelConfig.from_dict(raw, source=str(path))


def load_embedding_model(config: EngineConfig, mc: ModelConfig) -> EmbeddingModel:
    """Builds the body on the target device and fills it from the checkpoint: tensors named `model.x` (a causal
    LM's; its `lm_head` is skipped) or bare `x` (a body saved on its own)."""
    model_dir = pathlib.Path(config.model_dir)
    with torch.device("meta"):
        model = EmbeddingModel(mc)
    model = model.to_empty(device=config.device).to(config.resolve_dtype(mc))
    model.rotary.inv_freq = rope_inv_freq(mc.rope, mc.head_dim).to(config.device)
    model.rotary.reset_tables()
    if config.load_format == "dummy":
        return _random_weights(model, config.seed)
    params = dict(model.named_parameters())
    expected = {target for name, p in params.items() for target in _checkpoint_names(name, p, mc)}
    seen: set[str] = set()
    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for stored in f.keys():
                if stored.startswith("lm_head.") or stored.endswith("rotary_emb.inv_freq"):
                    continue
                name = stored if stored.startswith("model.") else f"model.{stored}"
                target = _param_slice(name, params, mc)
                if target is None:
                    raise ModelFilesError(f"{path.name}: unexpected tensor '{stored}' for an {mc.arch} body")
                tensor = f.get_tensor(stored)
                if tuple(tensor.shape) != tuple(target.shape):
                    raise ModelFilesError(f"{path.name}: tensor '{stored}' has shape {tuple(tensor.shape)}, "
                                          f"config.json implies {tuple(target.shape)}")
                with torch.no_grad():
                    target.copy_(tensor)
                seen.add(name)
    missing = sorted(expected - seen)
    if missing:
        raise ModelFilesError(f"{model_dir}: checkpoint lacks {len(missing)} tensor(s): {', '.join(missing[:5])}")
    return model.eval()


def pool(hidden: torch.Tensor, lengths: list[int], how: str) -> torch.Tensor:
    """One float32 vector per input from the flat hidden states [tokens, hidden]."""
    device = hidden.device
    lens = torch.tensor(lengths, device=device)
    ends = torch.cumsum(lens, 0)
    if how == "last":
        return hidden[ends - 1].float()
    if how == "cls":
        return hidden[ends - lens].float()
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=device), lens)
    sums = torch.zeros(len(lengths), hidden.shape[1], dtype=torch.float32, device=device)
    sums.index_add_(0, seq, hidden.float())
    return sums / lens[:, None].float()


class Embedder:
    """Loads an embedding model and embeds packed batches of token-id inputs (one forward per call)."""

    def __init__(self, config: EngineConfig, spec: EmbeddingSpec | None = None) -> None:
        self.config = config
        model_dir = pathlib.Path(config.model_dir)
        self.model_config = embedding_model_config(model_dir)
        self.spec = spec or EmbeddingSpec.from_dir(model_dir)
        self.max_model_len = min(config.max_model_len or self.model_config.max_position,
                                 self.model_config.max_position)
        self.dimensions = self.model_config.hidden_size
        self.device = torch.device(config.device)
        self.model = load_embedding_model(config, self.model_config)

    def check(self, inputs: list[list[int]]) -> None:
        """Raises InvalidRequestError naming the first input the model cannot take."""
        vocab = self.model_config.vocab_size
        for i, ids in enumerate(inputs):
            if not ids:
                raise InvalidRequestError(f"input {i} is empty")
            if len(ids) > self.max_model_len:
                raise InvalidRequestError(f"input {i} has {len(ids)} tokens; this model's maximum input length is "
                                          f"{self.max_model_len} tokens")
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidRequestError(f"input {i}: token id {bad} is outside the vocabulary [0, {vocab})")

    def embed(self, inputs: list[list[int]]) -> torch.Tensor:
        """[len(inputs), hidden] float32 on the CPU, in input order."""
        self.check(inputs)
        lengths = [len(ids) for ids in inputs]
        flat = torch.tensor([t for ids in inputs for t in ids], dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(n) for n in lengths]).to(self.device)
        batch = PackedAttention(lengths, self.device, self.model_config.sliding_window)
        hidden = self.model(flat, positions, batch)
        vectors = pool(hidden, lengths, self.spec.pooling)
        if self.spec.normalize:
            vectors = F.normalize(vectors, p=2, dim=-1)
        return vectors.cpu()
