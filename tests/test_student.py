"""Student construction from tiny teachers of every supported family."""

import pytest
import torch

from post.errors import ConfigError, PostError
from post.models import load_model, save_model, tiny_model
from post.student import build_student, param_count, parse_keep_layers

ARCHS = ["llama", "gpt2", "roberta", "gemma3"]


def n_layers(model):
    c = model.config
    return getattr(c, "num_hidden_layers", None) or c.n_layer


def test_parse_keep_layers():
    assert parse_keep_layers("0,1,-2,-1", 30) == [0, 1, 28, 29]
    assert parse_keep_layers(3, 30) == [3] and parse_keep_layers(-1, 30) == [29]  # keep_layers=3 read as YAML
    assert parse_keep_layers([0, -1, 0], 4) == [0, 3]
    with pytest.raises(ConfigError, match="does not exist"):
        parse_keep_layers("0,7", 4)
    with pytest.raises(ConfigError, match="integers"):
        parse_keep_layers("first,last", 4)


@pytest.mark.parametrize("arch", ARCHS)
def test_keeping_every_layer_reproduces_the_teacher(arch):
    teacher = tiny_model(arch)
    n = n_layers(teacher.model)
    student = build_student(teacher, list(range(n)))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(student.model(input_ids=ids).logits, teacher.model(input_ids=ids).logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_first_and_last_layer_student(arch, tmp_path):
    teacher = tiny_model(arch)
    n = n_layers(teacher.model)
    keep = [0, n - 1] if n > 2 else [n - 1]  # tiny teachers may have only 2 layers
    student = build_student(teacher, ",".join(map(str, keep)))
    assert n_layers(student.model) == len(keep)
    assert param_count(student.model) < param_count(teacher.model)
    emb_t, emb_s = teacher.model.get_input_embeddings().weight, student.model.get_input_embeddings().weight
    torch.testing.assert_close(emb_s, emb_t)
    if hasattr(teacher.model.config, "layer_types"):
        assert student.model.config.layer_types == [teacher.model.config.layer_types[i] for i in keep]
    idx = [m.layer_idx for m in student.model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    assert sorted(set(idx)) == list(range(len(set(idx)))) and max(idx, default=0) < len(keep)
    # Saved, it is an ordinary model directory that load_model accepts.
    save_model(student, tmp_path / "s")
    again = load_model(str(tmp_path / "s"))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(again.model(input_ids=ids).logits, student.model(input_ids=ids).logits)
    assert again.kind == teacher.kind


def test_unsupported_architecture_is_a_clear_error():
    teacher = tiny_model("llama")
    teacher.model.config.num_hidden_layers = 5  # no block list of that length exists
    with pytest.raises(PostError, match="transformer blocks"):
        build_student(teacher, "0,-1")
    teacher.model.config.num_hidden_layers = 2
