"""vLLM request building: the embeddings sent equal the transformers backend's, and bad tensors are refused."""

import base64
import io
import pickle

import pytest
import torch

from post.models import load_model
from post.prompt import init_prompt
from post.service.engine import MixedScorer
from post.service.errors import ApiError
from post.service.vllm import VllmRequestBuilder, check_embeds, decode_prompt_embeds
from test_service_support import SENTIMENT, TOPICS


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gemma3"])  # gemma3 scales its embeddings by sqrt(d)
def test_embeds_equal_the_transformers_backends_rows(model):
    loaded = load_model(model)
    scorer = MixedScorer(loaded, max_length=64)
    builder = VllmRequestBuilder(loaded.model.get_input_embeddings(), model_name=model, max_tokens=64)
    a = scorer.prepare("a", init_prompt(loaded, 3, init="random", seed=0), SENTIMENT)
    b = scorer.prepare("b", init_prompt(loaded, 6, init="random", seed=1), TOPICS)
    rows = scorer.rows(a, ["good"]) + scorer.rows(b, ["a much longer text about the flight"])
    inputs, answers = scorer.inputs(rows)
    for i, (p, text) in enumerate(((a, "good"), (b, "a much longer text about the flight"))):
        sent = builder.embeds(p, text)
        length = int(inputs["attention_mask"][i].sum())
        assert torch.equal(sent, inputs["inputs_embeds"][i, :length])
        assert int(answers[i]) == length - 1  # vLLM reads the next token after the last row: the same position
        body = builder.request(p, text)
        assert body["model"] == model and body["max_tokens"] == 1
        assert torch.equal(decode_prompt_embeds(body["prompt_embeds"], hidden_size=sent.shape[1], max_tokens=64),
                           sent)


def test_masked_lms_are_refused():
    loaded = load_model("tiny-roberta")
    scorer = MixedScorer(loaded, max_length=64)
    p = scorer.prepare("a", init_prompt(loaded, 2, init="random", seed=0), SENTIMENT)
    with pytest.raises(ApiError, match="causal"):
        VllmRequestBuilder(loaded.model.get_input_embeddings(), model_name="r", max_tokens=64).embeds(p, "x")


@pytest.mark.parametrize("tensor, what", [
    (torch.zeros(3, 8, 2), "shape"), (torch.zeros(3, 7), "shape"), (torch.zeros(0, 8), "shape"),
    (torch.zeros(65, 8), "shape"), (torch.zeros(3, 8, dtype=torch.int64), "dtype"),
    (torch.tensor([[float("nan")] * 8]), "finite"), (torch.tensor([[float("inf")] * 8]), "finite"),
    ([[0.0] * 8], "tensor"),
])
def test_crafted_embeddings_are_refused(tensor, what):
    with pytest.raises(ApiError, match=what):
        check_embeds(tensor, hidden_size=8, max_tokens=64)


class _Boom:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickle_payload_is_not_executed(capsys):
    buf = io.BytesIO()
    torch.save({"x": _Boom()}, buf)
    payload = base64.b64encode(buf.getvalue()).decode()
    with pytest.raises(ApiError, match="could not be read"):
        decode_prompt_embeds(payload, hidden_size=8, max_tokens=64)
    assert "pwned" not in capsys.readouterr().out
    with pytest.raises(ApiError):
        decode_prompt_embeds(base64.b64encode(pickle.dumps([1.0])).decode(), hidden_size=8, max_tokens=64)
