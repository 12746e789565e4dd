"""Makes PEFT adapters with the `peft` library on the committed fixture checkpoints and records what
transformers + peft compute with them.

Writes tests/fixtures/adapters/<name>/: adapter_config.json + adapter_model.safetensors as peft saves them,
and expected.json: the base checkpoint, the prompt, the logits at the prompt's last position and the
greedy ids of generate() (8 new tokens, EOS ignored) with the adapter active. Adapters:

- lora-gpt2: LoRA r=4, alpha=8 on GPT-2's Conv1D c_attn, c_proj (attention and MLP) and c_fc (fan_in_fan_out)
- lora-llama: rsLoRA r=2 on Llama's q_proj, v_proj, down_proj (nn.Linear), bf16 base weights
- ia3-gpt2: (IA)^3 on c_attn (keys/values side: output scaling) and mlp.c_proj (feed-forward: input scaling)
- prompt-gpt2: prompt tuning with 5 virtual tokens
- prefix-gpt2: prefix tuning, which layerwise refuses by name (config and weights only)

Every adapter's weights are random (peft's init would make most of them a no-op).

    python tools/scripts/make_adapter_fixtures.py   # needs torch, transformers==4.48.2, peft, safetensors
"""
import json
import os

import torch
from peft import (IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, PromptTuningInit,
                  TaskType, get_peft_model)
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(os.path.dirname(os.path.dirname(HERE)), "tests", "fixtures")
OUT = os.path.join(FIXTURES, "adapters")
PROMPT = [5, 17, 42, 3, 88, 61, 17, 9, 0, 73, 26, 50]
NEW_TOKENS = 8


def base(fixture):
    model = AutoModelForCausalLM.from_pretrained(os.path.join(FIXTURES, fixture), torch_dtype=torch.float32)
    return model.eval()


def randomize(model, seed):
    """Random values for every adapter parameter (peft initialises LoRA's B and (IA)^3 to a no-op)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                if "ia3_l" in name:
                    p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=gen))
                elif "prompt_embeddings" in name or "embedding" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def save(model, out):
    """peft's files, without the model card it writes beside them."""
    model.save_pretrained(out)
    os.remove(os.path.join(out, "README.md"))


def record(name, fixture, config, seed):
    model = get_peft_model(base(fixture), config)
    randomize(model, seed)
    out = os.path.join(OUT, name)
    save(model, out)
    # Read back as a user would load it, then run.
    model = PeftModel.from_pretrained(base(fixture), out).eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                   min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    new = generated[0, -NEW_TOKENS:].tolist()
    expected = {"base": fixture, "prompt": PROMPT, "last_logits": logits.tolist(), "greedy": new}
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f)
    print(name, new)


def main():
    os.makedirs(OUT, exist_ok=True)
    record("lora-gpt2", "gpt2-sharded",
           LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                      lora_dropout=0.1, task_type=TaskType.CAUSAL_LM), 1)
    record("lora-llama", "llama-bf16",
           LoraConfig(r=2, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                      task_type=TaskType.CAUSAL_LM), 2)
    record("ia3-gpt2", "gpt2-sharded",
           IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True,
                     task_type=TaskType.CAUSAL_LM), 3)
    record("prompt-gpt2", "gpt2-sharded",
           PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init=PromptTuningInit.RANDOM,
                              task_type=TaskType.CAUSAL_LM), 4)
    model = get_peft_model(base("gpt2-sharded"), PrefixTuningConfig(num_virtual_tokens=3, task_type=TaskType.CAUSAL_LM))
    save(model, os.path.join(OUT, "prefix-gpt2"))


if __name__ == "__main__":
    main()
