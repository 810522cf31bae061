"""Embeddings equal a transformers reference on the same random weights, in a packed batch as one by one."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from baton.engine.config import EngineConfig
from baton.engine.embedding import Embedder
from baton.engine.embedding_config import EmbeddingSpec
from baton.engine.errors import InvalidRequestError, ModelFilesError
from tests.engine.checkpoints import make_hf_checkpoint
from tests.engine.embedding_checkpoints import make_embedding_checkpoint, write_sentence_transformers_files

# Lengths 1..40 in a mixed order: several buckets, padded and unpadded, last/first tokens at bucket edges.
LENGTHS = [7, 1, 33, 12, 12, 40, 3, 19, 25, 2, 8, 31]


def _inputs(vocab: int, seed: int = 3) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in LENGTHS]


def _reference(model_dir, inputs, pooling: str, normalize: bool) -> torch.Tensor:
    import transformers

    model = transformers.AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in inputs:
            hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
            vec = {"last": hidden[-1], "cls": hidden[0], "mean": hidden.mean(0)}[pooling]
            out.append(F.normalize(vec, dim=-1) if normalize else vec)
    return torch.stack(out)


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.double(), b.double(), dim=-1)


@pytest.mark.parametrize("arch,pooling,normalize", [
    ("llama", "last", True), ("qwen2", "mean", True), ("qwen3", "last", False), ("qwen3", "cls", True),
    ("mistral", "mean", False),
])
def test_embeddings_equal_transformers(tmp_path, arch, pooling, normalize):
    model_dir = make_embedding_checkpoint(tmp_path / arch, arch, pooling=pooling, normalize=normalize, seed=5)
    embedder = Embedder(EngineConfig(model_dir=str(model_dir), device="cpu", show_progress=False))
    assert (embedder.spec.pooling, embedder.spec.normalize) == (pooling, normalize)
    inputs = _inputs(embedder.model_config.vocab_size)
    batched = embedder.embed(inputs)
    want = _reference(model_dir, inputs, pooling, normalize)
    assert batched.shape == (len(inputs), 64)
    assert _cosines(batched, want).min() >= 0.9999
    if not normalize:  # the magnitude is part of the answer too
        torch.testing.assert_close(batched, want, rtol=1e-4, atol=1e-4)
    one_by_one = torch.cat([embedder.embed([ids]) for ids in inputs])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-5)


def test_causal_lm_checkpoint_serves_embeddings_without_its_head(tmp_path):
    """A generation checkpoint (model.* names and an lm_head) embeds with its body; the head is skipped."""
    import transformers

    model_dir = make_hf_checkpoint(tmp_path / "lm", "qwen3", seed=2)
    write_sentence_transformers_files(model_dir, "last", True)
    embedder = Embedder(EngineConfig(model_dir=str(model_dir), device="cpu", show_progress=False))
    inputs = _inputs(embedder.model_config.vocab_size, seed=4)
    got = embedder.embed(inputs)
    lm = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = torch.stack([F.normalize(lm.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1], dim=-1)
                            for ids in inputs])
    assert _cosines(got, want).min() >= 0.9999


def test_spec_defaults_and_sentence_transformers_files(tmp_path):
    model_dir = make_embedding_checkpoint(tmp_path / "m", "llama", pooling="mean", normalize=False)
    (model_dir / "modules.json").unlink()
    assert EmbeddingSpec.from_dir(model_dir) == EmbeddingSpec(hidden_size=64)  # last token, normalised
    write_sentence_transformers_files(model_dir, "cls", False, prompts={"query": "Instruct: find\nQuery: "},
                                      default_prompt="query")
    config = json.loads((model_dir / "config.json").read_text())
    config["matryoshka_dimensions"] = [16, 32, 64]
    (model_dir / "config.json").write_text(json.dumps(config))
    spec = EmbeddingSpec.from_dir(model_dir)
    assert (spec.pooling, spec.normalize, spec.prefix) == ("cls", False, "Instruct: find\nQuery: ")
    assert spec.check_dimensions(32) is None
    assert "one of [16, 32, 64]" in spec.check_dimensions(20)
    assert "not a Matryoshka model" in EmbeddingSpec(hidden_size=64).check_dimensions(8)


def test_unsupported_pooling_is_named(tmp_path):
    model_dir = make_embedding_checkpoint(tmp_path / "m", "llama")
    (model_dir / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(ModelFilesError, match="pooling_mode_max_tokens"):
        EmbeddingSpec.from_dir(model_dir)
    (model_dir / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_mean_tokens": True, "include_prompt": False}))
    with pytest.raises(ModelFilesError, match="include_prompt false is not supported with mean pooling"):
        EmbeddingSpec.from_dir(model_dir)


def test_bad_inputs_are_refused_naming_the_limit(tmp_path):
    model_dir = make_embedding_checkpoint(tmp_path / "m", "llama", max_position=64)
    embedder = Embedder(EngineConfig(model_dir=str(model_dir), device="cpu", show_progress=False))
    with pytest.raises(InvalidRequestError, match="maximum input length is 64 tokens"):
        embedder.embed([[5] * 65])
    with pytest.raises(InvalidRequestError, match="input 1 is empty"):
        embedder.embed([[5], []])
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        embedder.embed([[5, 9999]])
