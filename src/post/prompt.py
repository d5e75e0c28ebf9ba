"""Soft prompts: initialisation and the prompt file.

A prompt file is one safetensors file holding the (n, d) tensor ``prompt`` and, in the
safetensors header's string metadata, a JSON document with

- the model it was tuned on: name, fingerprint (config + embedding matrix), tokenizer fingerprint,
  width, vocabulary size;
- the task: template, label words, init text;
- the privacy ledger (for DP prompts), without the training-set size;
- a sha256 over the tensor and the rest of the metadata, so an edited file is refused.

The prompt file is the only thing that crosses from the user to the provider, so what it may
hold is a contract (:data:`LEAVES_USER`): every metadata field is either covered by the privacy
ledger or public. It holds no accuracy measured on private data, no seed, no path and no
training-set size field (the ledger's q and step count still imply N/B); :func:`check_leaves_user`
enforces that on every write and every read.

Loading never unpickles; loading onto a model of another width, vocabulary or fingerprint is a
clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from post import __version__
from post.cache import atomic_path
from post.config import dtype_name
from post.errors import ConfigError, PostError
from post.models import LoadedModel, fingerprint_matches, model_fingerprint, tokenizer_fingerprint
from post.tasks import Task

FORMAT = "post-prompt/2"
InitMode = Literal["text", "vocab", "random"]

# What leaves the user: every field of a tuned prompt file's metadata, and why it may leave. The
# tensor itself is the output of the DP mechanism (covered by ``privacy``) or, without DP, the
# non-private prompt the user chose to release.
LEAVES_USER: dict[str, str] = {
    "format": "public: the file format's name",
    "post_version": "public: the version of this software",
    "model": "public: the provider's published student (name, fingerprint, tokenizer fingerprint, width, "
             "vocabulary size, kind)",
    "n_tokens": "public: the prompt length, a hyperparameter",
    "task": "public: the task definition (template, label words, init text) chosen on public data",
    "privacy": "covered: the DP ledger (σ, C, q, steps, δ, accountant, ε, randomness); ε is recomputed from it. "
               "N itself is not stored, but q = B/N and the planned steps imply N to anyone who knows the batch "
               "size B (also not stored): treat the order of magnitude of N as public",
    "checksum": "derived: a sha256 over the fields above and the tensor",
}
# Keys allowed inside the nested public fields.
MODEL_KEYS = frozenset({"name", "fingerprint", "tokenizer", "hidden_size", "vocab_size", "kind"})
TASK_KEYS = frozenset({"template", "label_words", "init_text"})
LEDGER_KEYS = frozenset({"noise_multiplier", "max_grad_norm", "sample_rate", "steps", "planned_steps", "delta",
                         "accountant", "target_epsilon", "epsilon", "randomness"})
# A transferred prompt is written by the provider (it never travels back as a user's file), and
# records where it came from.
PROVIDER_FIELDS = frozenset({"transferred_from"})


def public_model_name(name: str) -> str:
    """A model's name as it may leave the user: an alias or hub id as is, a local directory by its last part."""
    looks_local = Path(name).is_absolute() or name.startswith((".", "~")) or Path(name).exists()
    return f"local:{Path(name).name}" if looks_local else name


def check_leaves_user(meta: dict[str, Any], where: str = "the prompt file") -> None:
    """Refuse prompt metadata holding anything outside :data:`LEAVES_USER` (e.g. a private accuracy, a seed,
    a path or the training-set size)."""
    extra = set(meta) - set(LEAVES_USER) - PROVIDER_FIELDS
    model, task, ledger = (v if isinstance(v, dict) else {} for v in map(meta.get, ("model", "task", "privacy")))
    extra |= {f"model.{k}" for k in set(model) - MODEL_KEYS} | {f"task.{k}" for k in set(task) - TASK_KEYS}
    extra |= {f"privacy.{k}" for k in set(ledger) - LEDGER_KEYS}
    if isinstance(model.get("name"), str) and model["name"] != public_model_name(model["name"]):
        extra.add("model.name (a local path)")
    if extra:
        raise PostError(f"{where} carries fields that must not leave the user ({', '.join(sorted(extra))}); only "
                        f"{', '.join(LEAVES_USER)} may. Re-tune with this version of post.")


def init_prompt(loaded: LoadedModel, n_tokens: int, *, init: str = "text", init_text: str = "",
                seed: int = 0) -> torch.Tensor:
    """An (n, d) fp32 prompt: ``init_text``'s embeddings tiled to n tokens, random vocabulary rows, or noise.

    Embeddings come from the model's own input-embedding layer, so a model that scales them
    (Gemma multiplies by sqrt(d)) gets a prompt on the same scale as its token embeddings.
    """
    if n_tokens < 1:
        raise ConfigError(f"--n-tokens must be at least 1, got {n_tokens}.")
    emb = loaded.model.get_input_embeddings()
    vocab = emb.weight.shape[0]
    g = torch.Generator().manual_seed(seed)
    if init == "text":
        ids = loaded.tokenizer(init_text, add_special_tokens=False)["input_ids"] if init_text else []
        if not ids:
            raise ConfigError("--init text needs a non-empty --init-text (or the task's init text).")
        ids = (ids * (n_tokens // len(ids) + 1))[:n_tokens]
    elif init == "vocab":
        special = set(loaded.tokenizer.all_special_ids)
        pool = torch.tensor([i for i in range(min(vocab, len(loaded.tokenizer))) if i not in special])
        ids = pool[torch.randint(len(pool), (n_tokens,), generator=g)].tolist()
    elif init == "random":
        with torch.no_grad():
            scale = emb(torch.arange(min(vocab, 4096), device=emb.weight.device)).float().std()
        return torch.randn(n_tokens, emb.weight.shape[1], generator=g) * scale.cpu()
    else:
        raise ConfigError(f"--init must be text, vocab or random, got {init!r}.")
    with torch.no_grad():
        return emb(torch.tensor(ids, device=emb.weight.device)).float().cpu().clone()


def vocab_size(loaded: LoadedModel) -> int:
    """Rows of the model's input-embedding matrix."""
    return int(loaded.model.get_input_embeddings().weight.shape[0])


@dataclass
class PromptFile:
    """A loaded prompt: the (n, d) tensor and its metadata."""

    tensor: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> Task:
        return Task.from_dict(self.meta["task"])

    @property
    def n_tokens(self) -> int:
        return int(self.tensor.shape[0])

    def summary(self) -> dict[str, Any]:
        ledger = self.meta.get("privacy")
        origin = self.meta.get("transferred_from")
        return {"path": self.meta.get("path"), "model": self.meta["model"]["name"], "n_tokens": self.n_tokens,
                "method": (origin.get("method", "post") if origin else "tuned"),
                "source_model": origin["model"]["name"] if origin else None,
                "epsilon": ledger["epsilon"] if ledger else None, "delta": ledger["delta"] if ledger else None,
                "target_epsilon": ledger.get("target_epsilon") if ledger else None}


def _checksum(tensor: torch.Tensor, meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k not in ("checksum", "path")}
    h = hashlib.sha256(json.dumps(body, sort_keys=True).encode())
    h.update(tensor.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_prompt(path: str | os.PathLike[str], tensor: torch.Tensor, *, loaded: LoadedModel, task: Task,
                privacy: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write a prompt file atomically; returns its path.

    ``privacy`` is the ledger as it may leave the user (:meth:`PrivacyLedger.public`); anything
    outside :data:`LEAVES_USER` is refused before a byte is written.
    """
    tensor = tensor.detach().float().cpu().contiguous()
    meta: dict[str, Any] = {
        "format": FORMAT,
        "post_version": __version__,
        "model": {"name": public_model_name(loaded.name), "fingerprint": model_fingerprint(loaded.model),
                  "tokenizer": tokenizer_fingerprint(loaded.tokenizer),
                  "hidden_size": loaded.hidden_size, "vocab_size": vocab_size(loaded), "kind": loaded.kind},
        "n_tokens": int(tensor.shape[0]),
        "task": task.to_dict(),
        "privacy": privacy,
        **(extra or {}),
    }
    check_leaves_user(meta)
    meta["checksum"] = _checksum(tensor, meta)
    out = Path(path)
    with atomic_path(out) as tmp:
        save_file({"prompt": tensor}, str(tmp), metadata={"post": json.dumps(meta)})
    return out


def read_prompt(path: str | os.PathLike[str]) -> PromptFile:
    """Read and integrity-check a prompt file without any model."""
    p = Path(path)
    if not p.is_file():
        raise PostError(f"no prompt file at {p}; pass the prompt.safetensors that post tune wrote.")
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise PostError(f"{p} is not a readable safetensors prompt file ({e}); it may be truncated or "
                        "corrupt.") from None
    if "post" not in header or "prompt" not in tensors:
        raise PostError(f"{p} is a safetensors file but not a POST prompt file (no 'post' metadata or "
                        "'prompt' tensor).")
    try:
        meta = json.loads(header["post"])
    except json.JSONDecodeError:
        raise PostError(f"{p} has unreadable prompt metadata; the file is corrupt.") from None
    tensor = tensors["prompt"]
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PostError(f"{p} has prompt format {meta.get('format') if isinstance(meta, dict) else None!r}; "
                        f"this version reads {FORMAT}.")
    if meta.get("checksum") != _checksum(tensor, meta):
        raise PostError(f"{p} fails its checksum: the prompt or its metadata was edited after it was written; "
                        "use the file post tune produced.")
    if tensor.dim() != 2 or tensor.shape[0] != meta.get("n_tokens") or not torch.isfinite(tensor).all():
        raise PostError(f"{p} holds a prompt of shape {tuple(tensor.shape)} that does not match its metadata.")
    _check_meta(p, meta)
    meta["path"] = str(p)  # where it was read from; a path stored in the file is never used
    return PromptFile(tensor=tensor, meta=meta)


def _check_meta(p: Path, meta: dict[str, Any]) -> None:
    """Refuse metadata whose parts the stages rely on are missing or of the wrong kind.

    The checksum only shows the file is as it was written; a file written by someone else can
    carry a matching checksum over anything, so the parts are checked too (and a privacy ledger is
    recomputed, so its ε is one the accountant agrees with).
    """
    from post.accounting import PrivacyLedger

    model = meta.get("model")
    model_ok = isinstance(model, dict) and isinstance(model.get("name"), str) and \
        isinstance(model.get("fingerprint"), str) and all(
            isinstance(model.get(k), int) and not isinstance(model.get(k), bool) for k in ("hidden_size", "vocab_size"))
    origin = meta.get("transferred_from")
    origin_ok = origin is None or (isinstance(origin, dict) and isinstance(origin.get("model"), dict)
                                   and isinstance(origin["model"].get("name"), str))
    if not (model_ok and origin_ok and isinstance(meta.get("task"), dict)):
        raise PostError(f"{p} has incomplete prompt metadata (model, task or provenance); it was not "
                        "written by post.")
    check_leaves_user(meta, str(p))
    Task.from_dict(meta["task"])
    if meta.get("privacy") is not None:
        try:
            PrivacyLedger.from_dict(meta["privacy"])
        except PostError as e:
            raise PostError(f"{p}: {e}") from None


def check_compatible(pf: PromptFile, loaded: LoadedModel, *, same_model: bool = True) -> None:
    """Refuse a prompt that can't be used on ``loaded``: width, vocabulary, or (if ``same_model``) fingerprint."""
    m = pf.meta["model"]
    where = pf.meta.get("path", "the prompt")
    if int(m["hidden_size"]) != loaded.hidden_size:
        raise PostError(f"{where} was tuned on {m['name']} (width {m['hidden_size']}), but {loaded.name} has width "
                        f"{loaded.hidden_size}; use post transfer to move it to this model.")
    vocab = vocab_size(loaded)
    if same_model and int(m["vocab_size"]) != vocab:
        raise PostError(f"{where} was tuned on {m['name']} with a {m['vocab_size']}-token vocabulary, but "
                        f"{loaded.name} has {vocab}; its label words would mean other tokens.")
    if same_model and m.get("tokenizer") not in (None, tokenizer_fingerprint(loaded.tokenizer)):
        raise PostError(f"{where} was tuned with another tokenizer than {loaded.name}'s (same vocabulary size, other "
                        "tokens), so its label words would mean other tokens; pass the model it was tuned on.")
    if same_model and not fingerprint_matches(m["fingerprint"], loaded.model):
        hint = "" if loaded.model.dtype == torch.float32 else (
            f" (the model is loaded in {dtype_name(loaded.model.dtype)}: a prompt file written before "
            "fingerprints ignored the precision matches its model only in float32, so try --dtype float32)")
        raise PostError(f"{where} was tuned on {m['name']} (fingerprint {m['fingerprint'][:12]}), not on {loaded.name} "
                        f"({model_fingerprint(loaded.model)[:12]}); pass the model it was tuned on, or transfer it"
                        f"{hint}.")


def load_prompt(path: str | os.PathLike[str], loaded: LoadedModel, *, same_model: bool = True) -> PromptFile:
    """Read a prompt file and check it fits ``loaded``."""
    pf = read_prompt(path)
    check_compatible(pf, loaded, same_model=same_model)
    return pf
