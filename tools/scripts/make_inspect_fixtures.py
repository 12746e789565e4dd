"""Records what transformers 4.48 shows inside the committed fixture checkpoints, for the lens,
activation, attention and head-mask tests.

Writes tests/fixtures/inspect/<fixture>.safetensors for gpt2-sharded, gpt-neo-bin and llama-bf16:
- `act.<name>`: module outputs by name (forward hooks; `resid_mid` is the input of the second norm),
- `attn.<block>`: attention probabilities (`output_attentions`, eager attention) [heads, t, t],
- `masked.logits` + `head_mask` (GPT-2, GPT-Neo): logits with `head_mask` (llama has none in 4.48),
- `heads.*` (gpt2-sharded): the LM loss over texts.json with every head and with each head masked
  (importance), and the logits of the checkpoint `layerwise heads --prune` wrote, reloaded by
  transformers (checked here to equal the masked model's), with the mask it found,
- `lens.<decoder>.<stat>`: the logit lens computed here from hooked states pushed through the same
  decoder with transformers' own modules (final norm + LM head, exit heads, the last block's MLP or
  the whole last block run on the states): `top_ids`, `top_probs` [rows, t, k], `entropy`,
  `kl_to_final`, `final_top_rank` [rows, t], `next_rank` [rows, t - 1].

    python tools/scripts/make_inspect_fixtures.py   # needs torch, transformers==4.48.2, safetensors
"""
import json
import os
import subprocess
import tempfile

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(os.path.dirname(os.path.dirname(HERE)), "tests", "fixtures")
OUT = os.path.join(FIXTURES, "inspect")
PROMPT = [5, 17, 42, 3, 88, 61, 17, 9]  # longer than GPT-Neo's local window (4)
TOP_K = 3


def load(fixture):
    model = AutoModelForCausalLM.from_pretrained(
        os.path.join(FIXTURES, fixture), torch_dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def parts(model):
    """(blocks, names of the block's norm_1/attention/norm_2/mlp modules, final norm, embeddings name)."""
    if model.config.model_type == "llama":
        return (model.model.layers, ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"),
                model.model.norm, "layers", "norm")
    return model.transformer.h, ("ln_1", "attn", "ln_2", "mlp"), model.transformer.ln_f, "h", "ln_f"


def record_activations(model, ids):
    """Every module output by its layerwise name, plus block outputs, resid_mid and the embeddings."""
    blocks, (n1, at, n2, mlp), ln_f, prefix, ln_name = parts(model)
    seen, hooks = {}, []

    def keep(name, take_input=False):
        def hook(module, args, output):
            value = args[0] if take_input else (output[0] if isinstance(output, tuple) else output)
            seen[name] = value[0].detach().clone()
        return hook

    for i, block in enumerate(blocks):
        hooks.append(block.register_forward_hook(keep(f"{prefix}.{i}")))
        for sub in (n1, at, n2, mlp):
            hooks.append(getattr(block, sub).register_forward_hook(keep(f"{prefix}.{i}.{sub}")))
        hooks.append(getattr(block, n2).register_forward_hook(keep(f"{prefix}.{i}.resid_mid", take_input=True)))
    hooks.append(ln_f.register_forward_hook(keep(ln_name)))
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True, output_attentions=True)
    for h in hooks:
        h.remove()
    seen["embed"] = out.hidden_states[0][0]
    return seen, out


def lens_stats(log_probs, final_log_probs, ids):
    """The Lens fields from [rows, t, vocab] natural log-probabilities (float64)."""
    probs = log_probs.exp()
    top = log_probs.topk(TOP_K, dim=-1)
    final_top = final_log_probs.argmax(-1)  # [t]
    at_final_top = log_probs.gather(-1, final_top.expand(log_probs.shape[0], -1).unsqueeze(-1))
    nxt = torch.tensor(ids[1:])
    at_next = log_probs[:, :-1, :].gather(-1, nxt.expand(log_probs.shape[0], -1).unsqueeze(-1))
    return {
        "top_ids": top.indices.to(torch.int64),
        "top_probs": top.values.exp().float(),
        "entropy": (-(probs * log_probs).sum(-1)).float(),
        "kl_to_final": (final_log_probs.exp() * (final_log_probs - log_probs)).sum(-1).float(),
        "final_top_rank": (log_probs >= at_final_top).sum(-1).to(torch.int64),
        "next_rank": (log_probs[:, :-1, :] >= at_next).sum(-1).to(torch.int64),
    }


def run_block_part(model, block, x, part):
    """transformer-utils' decoder layer: `x + part(norm(x))`, or the whole block, over the positions of x."""
    t = x.shape[1]
    kwargs = {}
    if model.config.model_type == "llama":
        position_ids = torch.arange(t)[None]
        kwargs["position_embeddings"] = model.model.rotary_emb(x, position_ids)
        kwargs["attention_mask"] = torch.full((t, t), float("-inf")).triu(1)[None, None]
    if part == "mlp":
        norm = block.post_attention_layernorm if model.config.model_type == "llama" else block.ln_2
        return x + block.mlp(norm(x))
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def record_lens(model, fixture, acts, ids, tensors):
    blocks, (_, attn_name, _, mlp_name), ln_f, prefix, _ = parts(model)
    n = len(blocks)
    head = model.lm_head.weight.float()
    rows = ["embed"] + [f"{prefix}.{i}" for i in range(n)]
    states = torch.stack([acts[r] for r in rows])  # [rows, t, hidden]
    with torch.no_grad():
        final = torch.log_softmax((ln_f(acts[f"{prefix}.{n - 1}"]) @ head.T).double(), -1)

        def decoded(x):
            return torch.log_softmax((ln_f(x) @ head.T).double(), -1)

        decoders = {"final": (rows, decoded(states))}
        sub_rows = ["embed"] + [f"{prefix}.{i}.{s}" for i in range(n) for s in (attn_name, mlp_name)]
        sub_states = torch.stack([acts["embed"]] + [acts[f"{prefix}.{i}{s}"] for i in range(n)
                                                     for s in (".resid_mid", "")])
        decoders["subblocks"] = (sub_rows, decoded(sub_states))
        last = blocks[n - 1]
        decoders["last_mlp"] = (rows, torch.stack(
            [decoded(run_block_part(model, last, s[None], "mlp")[0]) for s in states]))
        decoders["last_block"] = (rows, torch.stack(
            [decoded(run_block_part(model, last, s[None], "block")[0]) for s in states]))
        exits = json.load(open(os.path.join(FIXTURES, fixture, "config.json")))["lm_head_layer_indices"]
        weights = {}
        for name in os.listdir(os.path.join(FIXTURES, fixture)):
            if name.endswith(".safetensors") and name != "expected.safetensors" and "generation" not in name:
                weights.update(load_file(os.path.join(FIXTURES, fixture, name)))
        if not weights:
            weights = torch.load(os.path.join(FIXTURES, fixture, "pytorch_model.bin"), weights_only=True)
        exit_rows = [f"{prefix}.{layer - 1}" for layer in exits]
        decoders["exits"] = (exit_rows, torch.stack([
            torch.log_softmax((ln_f(acts[r]) @ weights[f"name_to_lm_exit_head.lm_head_{layer}.weight"].float().T)
                              .double(), -1) for r, layer in zip(exit_rows, exits)]))
        conversions = sorted(int(k.split(".")[1].split("_")[0]) for k in weights if k.startswith("name_to_conv_matrix."))
        if conversions:  # upstream's converted projection: the conversion matrix after the final norm
            conv_rows = [f"{prefix}.{layer - 1}" for layer in conversions] + [f"{prefix}.{n - 1}"]
            decoders["converted"] = (conv_rows, torch.stack([
                torch.log_softmax((ln_f(acts[r]) @ weights[f"name_to_conv_matrix.{layer}_to_{n}.weight"].float().T
                                   @ head.T).double(), -1) for r, layer in zip(conv_rows, conversions)]
                + [decoded(acts[f"{prefix}.{n - 1}"])]))
    meta = {}
    for name, (labels, log_probs) in decoders.items():
        meta[name] = labels
        for stat, value in lens_stats(log_probs, final, ids).items():
            tensors[f"lens.{name}.{stat}"] = value.contiguous()
    return meta


TEXTS = [[5, 17, 42, 3, 88, 61, 17, 9, 0, 73], [26, 50, 5, 17, 42, 11, 7], [1, 2, 3, 4, 5, 6, 7, 8]]
THRESHOLD = 0.02


def lm_loss(model, head_mask=None):
    """Token-weighted mean next-token cross-entropy over TEXTS (transformers' loss, summed back)."""
    total, count = 0.0, 0
    for text in TEXTS:
        with torch.no_grad():
            out = model(torch.tensor([text]), labels=torch.tensor([text]), head_mask=head_mask)
        total += out.loss.item() * (len(text) - 1)
        count += len(text) - 1
    return total / count


def record_heads(model, tensors):
    """Importance by ablation with transformers' head_mask, and the pruned checkpoint reloaded."""
    n, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    tensors["heads.base_loss"] = torch.tensor([lm_loss(model)], dtype=torch.float64)
    increase = torch.zeros(n, heads, dtype=torch.float64)
    for layer in range(n):
        for head in range(heads):
            mask = torch.ones(n, heads)
            mask[layer, head] = 0.0
            increase[layer, head] = lm_loss(model, mask) - tensors["heads.base_loss"][0]
    tensors["heads.importance"] = increase
    json.dump(TEXTS, open(os.path.join(OUT, "texts.json"), "w"))
    root = os.path.dirname(FIXTURES)
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(["cargo", "run", "--release", "--quiet", "--bin", "layerwise", "--", "heads", "--model",
                        os.path.join(FIXTURES, "gpt2-sharded"), "--texts", os.path.join(OUT, "texts.json"),
                        "--threshold", str(THRESHOLD), "--prune", "--out", out], check=True, cwd=os.path.dirname(root))
        found = json.load(open(os.path.join(out, "pruning.json")))["search"]["mask"]
        mask = torch.tensor(found, dtype=torch.float32)
        reloaded = AutoModelForCausalLM.from_pretrained(os.path.join(out, "pruned"), torch_dtype=torch.float32,
                                                        attn_implementation="eager").eval()
        assert reloaded.config.pruned_heads, "transformers read pruned_heads"
        with torch.no_grad():
            pruned_logits = reloaded(torch.tensor([PROMPT])).logits[0]
            masked_logits = model(torch.tensor([PROMPT]), head_mask=mask).logits[0]
        assert torch.allclose(pruned_logits, masked_logits, atol=1e-5), "the pruned checkpoint computes the masked model"
        params = sum(p.numel() for p in reloaded.parameters())
    tensors["heads.mask"] = mask
    tensors["heads.pruned_logits"] = pruned_logits.contiguous()
    tensors["heads.masked_logits"] = masked_logits.contiguous()
    tensors["heads.pruned_parameters"] = torch.tensor([params], dtype=torch.int64)
    print(f"  pruning: {int((mask == 0).sum())} heads masked, {params} parameters after")


def main():
    os.makedirs(OUT, exist_ok=True)
    meta = {"prompt": PROMPT, "top_k": TOP_K, "threshold": THRESHOLD}
    for fixture in ["gpt2-sharded", "gpt-neo-bin", "llama-bf16"]:
        model = load(fixture)
        acts, out = record_activations(model, PROMPT)
        tensors = {f"act.{name}": value.contiguous() for name, value in acts.items()}
        tensors["logits"] = out.logits[0].contiguous()
        for i, attn in enumerate(out.attentions):
            tensors[f"attn.{i}"] = attn[0].contiguous()
        if model.config.model_type != "llama":
            n, heads = model.config.num_hidden_layers, model.config.num_attention_heads
            head_mask = torch.ones(n, heads)
            head_mask[0, 1] = 0.0
            head_mask[1, 0] = 0.0
            head_mask[1, 3] = 0.5
            head_mask[n - 1, 2] = 0.0
            with torch.no_grad():
                masked = model(torch.tensor([PROMPT]), head_mask=head_mask, output_attentions=True)
            tensors["head_mask"] = head_mask
            tensors["masked.logits"] = masked.logits[0].contiguous()
            tensors["masked.attn.1"] = masked.attentions[1][0].contiguous()
        meta[fixture] = record_lens(model, fixture, acts, PROMPT, tensors)
        if fixture == "gpt2-sharded":
            record_heads(model, tensors)
        save_file(tensors, os.path.join(OUT, f"{fixture}.safetensors"))
        print(f"  {fixture}: {len(tensors)} tensors")
    json.dump(meta, open(os.path.join(OUT, "lens.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
