"""The built-in models for real: download (or reuse the cache), convert, load, check outputs.

Uses the normal cache (``$POST_CACHE_DIR`` or the user cache dir), so a converted model is
reused; the first run downloads ~350 MB and takes about a minute per model on 2 CPU cores.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM

from post.cache import cache_root, sha256_file
from post.models import BUILTIN_MODELS, MANIFEST, fetch_model, load_model, model_fingerprint

pytestmark = pytest.mark.integration

TEXTS = ["The capital of France is", "I loved this film, the actors were wonderful. It was"]


@pytest.fixture(scope="module", params=list(BUILTIN_MODELS))
def alias(request) -> str:
    fetch_model(request.param)
    return request.param


def _gguf(alias: str) -> Path:
    return cache_root() / "downloads" / BUILTIN_MODELS[alias].gguf_name


def test_converted_model_equals_gguf_model(alias):
    loaded = load_model(alias)
    gguf = _gguf(alias)
    assert sha256_file(gguf) == BUILTIN_MODELS[alias].gguf_sha256
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    for text in [*TEXTS, "Ünïcödé, 日本語 and <b>markup</b>\n\ttabs"]:
        assert loaded.tokenizer(text)["input_ids"] == ref_tok(text)["input_ids"]
    enc = loaded.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        got = loaded.model(**enc).logits
        want = ref(**enc, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # Tied input/output embeddings must survive the conversion.
    assert loaded.model.config.tie_word_embeddings is ref.config.tie_word_embeddings
    assert model_fingerprint(loaded.model) == model_fingerprint(ref)


def test_sensible_next_token_and_stable_fingerprint(alias):
    first, second = load_model(alias), load_model(alias)
    assert model_fingerprint(first.model) == model_fingerprint(second.model)
    assert first.kind == "causal" and first.model.config.use_cache is False
    tok = first.tokenizer
    with torch.no_grad():
        logits = first.model(**tok(TEXTS[0], return_tensors="pt")).logits[0, -1]
    top5 = [tok.decode(int(i)) for i in logits.topk(5).indices]
    # SmolLM2 answers " Paris" first; Gemma 3 base puts it third, after " the" and " a".
    assert " Paris" in top5, top5


def test_gemma_config_reloads_as_text_causal_lm():
    loaded = load_model("gemma-3-270m")
    config = loaded.model.config
    assert isinstance(loaded.model, Gemma3ForCausalLM) and config.model_type == "gemma3_text"
    assert len(config.layer_types) == config.num_hidden_layers == 18
    assert set(config.layer_types) == {"sliding_attention", "full_attention"}
    assert config.sliding_window == 512 and "quantization_config" not in config.to_dict()
    saved = json.loads((loaded.path / "config.json").read_text())
    assert saved["architectures"] == ["Gemma3ForCausalLM"] and saved["layer_types"] == config.layer_types


def test_verify_detects_and_repairs_corruption(tmp_path, capsys):
    """On a private copy of the smollm2 cache, so the shared one is never left damaged."""
    alias = "smollm2-135m"
    src = fetch_model(alias)
    copy = tmp_path / "cache"
    shutil.copytree(src, copy / "models" / alias)
    (copy / "downloads").mkdir()
    shutil.copy(_gguf(alias), copy / "downloads")
    weights = copy / "models" / alias / "model.safetensors"
    good = sha256_file(weights)
    with open(weights, "r+b") as f:
        f.seek(weights.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))
    assert sha256_file(weights) != good
    assert fetch_model(alias, cache_dir=copy, verify=True) == copy / "models" / alias
    assert sha256_file(weights) == good
    assert "fails its checksum" in capsys.readouterr().err
    manifest = json.loads((copy / "models" / alias / MANIFEST).read_text())
    assert manifest["files"]["model.safetensors"]["sha256"] == good
