"""Tiny random models and a tiny trained tokenizer, for tests and smoke runs (no download).

The tokenizer is a byte-level BPE trained in memory on a fixed English corpus, so every input
encodes (unknown characters fall back to bytes) and the sentiment label words of
:data:`post.tasks.SENTIMENT_WORDS` are single tokens with their leading space. Models are
built from small configs of the real architectures with fixed seeds, so the same seed gives
the same weights in every process.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForMaskedLM,
)

from post.errors import ConfigError

TINY_ARCHS: tuple[str, ...] = ("llama", "gpt2", "roberta", "gemma3")
SPECIAL_TOKENS: tuple[str, ...] = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
VOCAB_SIZE = 512
MAX_POSITIONS = 256
LABEL_WORDS: tuple[str, ...] = (
    " terrible", " negative", " bad", " poor", " awful",
    " moderate", " neutral", " balanced",
    " positive", " good", " great", " awesome", " brilliant", " amazing",
)

_CORPUS = """\
Predict if sentiment of this review is positive or negative.
The film was a great story about a family that moves to a small town by the sea. It was good.
I loved the music and the actors, and the ending made me smile. It was amazing.
The plot was slow and the dialogue was poor, so I left before the end. It was bad.
This is one of the worst movies of the year: boring, long and awful. It was terrible.
A brilliant cast, a clever script and some awesome scenes. It was brilliant.
The service at the airline was fine, not good and not bad either. It was neutral.
My flight was late again and nobody told us why. It was negative.
The staff were kind and the seats were comfortable. It was positive.
The food was moderate, the price was fair, and the room was clean. It was balanced.
We waited three hours at the gate and then the flight was cancelled. It was awful.
What a wonderful day with friends, we laughed all the time. It was great.
The book is better than the movie, but the movie is still worth seeing. It was good.
He said the show would start at nine, but it did not start until ten. It was poor.
She thinks the new album is their best work so far. It was awesome.
The first half is funny and the second half is sad, which is a strange mix. It was moderate.
There is nothing new here, and the jokes are old and tired. It was bad.
Every scene looks beautiful, and the story keeps you thinking long after. It was amazing.
They have a lot of work to do before the next season. It was neutral.
You can watch it once, but you will not want to watch it again. It was negative.
"""


def _training_text() -> list[str]:
    # Repeating the label words makes BPE merge each of them into one token early.
    drills = [f"It was{w}." for w in LABEL_WORDS for _ in range(40)]
    return _CORPUS.splitlines() + drills


@functools.cache
def _trained_tokenizer_json() -> str:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[AddedToken(t, lstrip=t == "<mask>", special=True) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(kind: Literal["causal", "masked"] = "causal") -> PreTrainedTokenizerFast:
    """A fresh tokenizer object (safe to mutate); the BPE is trained once per process.

    Causal: adds no special tokens. Masked: wraps inputs as ``<s> ... </s>`` like RoBERTa, and
    ``<mask>`` swallows the space before it (so " <mask>" scores label words like " good").
    """
    backend = Tokenizer.from_str(_trained_tokenizer_json())
    if kind == "masked":
        backend.post_processor = processors.RobertaProcessing(
            ("</s>", backend.token_to_id("</s>")), ("<s>", backend.token_to_id("<s>")), add_prefix_space=False
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        model_max_length=MAX_POSITIONS,
        padding_side="right",
    )
    return tokenizer


def build_tiny(arch: str, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerFast, str]:
    """(model, tokenizer, kind) for a tiny random ``arch`` in :data:`TINY_ARCHS`."""
    if arch not in TINY_ARCHS:
        raise ConfigError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_ARCHS)}.")
    kind = "masked" if arch == "roberta" else "causal"
    tok = tiny_tokenizer(kind)  # type: ignore[arg-type]
    ids = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id}
    torch.manual_seed(seed)
    model: PreTrainedModel
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True,
            use_cache=False, **ids))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(
            n_embd=64, n_layer=2, n_head=4, n_positions=MAX_POSITIONS, use_cache=False, **ids))
    elif arch == "roberta":
        # RoBERTa's positions start after the padding index, hence the +2.
        model = RobertaForMaskedLM(RobertaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=MAX_POSITIONS + 2, type_vocab_size=1, use_cache=False, **ids))
    else:
        # Two sliding-window layers around a full one, with a window short enough to matter.
        model = Gemma3ForCausalLM(Gemma3TextConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True, use_cache=False, **ids))
    return model, tok, kind
