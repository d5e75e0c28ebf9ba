"""The PEFT export round trip and prompted scoring on the real smollm2-135m."""

import pytest
import torch

pytestmark = pytest.mark.integration


def test_peft_adapter_reproduces_prompted_logits_on_smollm2(tmp_path):
    from peft import PeftModel

    from post.export import ExportPeftConfig, export_peft
    from post.models import load_model
    from post.prompt import init_prompt, save_prompt
    from post.tasks import Task

    loaded = load_model("smollm2-135m")
    prompt = init_prompt(loaded, 10, init="vocab", seed=3)
    path = save_prompt(tmp_path / "p.safetensors", prompt, loaded=loaded, task=Task())
    export_peft(ExportPeftConfig(prompt=path, model="smollm2-135m"), tmp_path / "adapter")
    ids = loaded.tokenizer(["a gripping, beautifully shot film It was"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        emb = loaded.model.get_input_embeddings()(ids)
        ours = loaded.model(inputs_embeds=torch.cat([prompt[None], emb], 1), use_cache=False).logits[:, -1]
        peft_model = PeftModel.from_pretrained(load_model("smollm2-135m").model, str(tmp_path / "adapter"))
        theirs = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1]
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0)
