"""Records transformers 4.48's decoding-strategy behaviour on the committed fixture checkpoints.

Writes tests/fixtures/strategies/: processors.safetensors + processors.json (processed scores of each
logits processor and warper chain on fixed logits), and generation.json (token ids of generate() with
repetition penalty, no-repeat n-grams and stop strings on every fixture architecture) and beams.json (beam
search with each early_stopping rule, length penalties and several returned sequences; under ACD through
upstream autocontrastive-gen).

    python tools/scripts/make_strategy_fixtures.py   # needs torch, transformers==4.48.2, safetensors
"""
import json
import os

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.logits_process import (MinPLogitsWarper, NoRepeatNGramLogitsProcessor,
                                                    RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper, TypicalLogitsWarper)

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(os.path.dirname(os.path.dirname(HERE)), "tests", "fixtures")
OUT = os.path.join(FIXTURES, "strategies")
PROMPT = [5, 17, 42, 3, 88, 61, 17, 9, 0, 73, 26, 50]  # the prompt of tools/scripts/make_fixtures.py


def fixture_models():
    """(name, transformers model in f32) for each fixture architecture."""
    for fixture in ["gpt2-sharded", "gpt-neo-bin", "llama-bf16"]:
        model = AutoModelForCausalLM.from_pretrained(os.path.join(FIXTURES, fixture), torch_dtype=torch.float32)
        model.eval()
        yield fixture, model


def record_processors():
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(1, 96, generator=gen) * 3
    sequence = [5, 17, 42, 3, 88, 61, 17, 9, 0, 73, 5, 17]  # "5 17" repeats: bigram and trigram bans
    ids = torch.tensor([sequence])
    # Each case: the processors in transformers' order, with their arguments.
    cases = [
        {"repetition_penalty": 1.3},
        {"repetition_penalty": 0.8},
        {"no_repeat_ngram_size": 2},
        {"no_repeat_ngram_size": 3},
        {"min_p": 0.05},
        {"min_p": 0.3, "temperature": 0.7},
        {"typical_p": 0.9},
        {"typical_p": 0.5, "top_k": 20},
        {"repetition_penalty": 1.2, "no_repeat_ngram_size": 2, "temperature": 0.8, "top_k": 30, "top_p": 0.9,
         "min_p": 0.02, "typical_p": 0.95},
    ]
    tensors = {"logits": logits[0].contiguous()}
    for i, case in enumerate(cases):
        scores = logits.clone()
        if case.get("repetition_penalty", 1.0) != 1.0:
            scores = RepetitionPenaltyLogitsProcessor(case["repetition_penalty"])(ids, scores)
        if case.get("no_repeat_ngram_size", 0) > 0:
            scores = NoRepeatNGramLogitsProcessor(case["no_repeat_ngram_size"])(ids, scores)
        if case.get("temperature", 1.0) != 1.0:
            scores = TemperatureLogitsWarper(case["temperature"])(ids, scores)
        if case.get("top_k", 0) > 0:
            scores = TopKLogitsWarper(case["top_k"])(ids, scores)
        if case.get("top_p", 1.0) < 1.0:
            scores = TopPLogitsWarper(case["top_p"])(ids, scores)
        if "min_p" in case:
            scores = MinPLogitsWarper(case["min_p"])(ids, scores)
        if case.get("typical_p", 1.0) < 1.0:
            scores = TypicalLogitsWarper(case["typical_p"])(ids, scores)
        tensors[f"processed.{i}"] = scores[0].contiguous()
    save_file(tensors, os.path.join(OUT, "processors.safetensors"))
    json.dump({"sequence": sequence, "cases": cases}, open(os.path.join(OUT, "processors.json"), "w"), indent=1)
    print(f"  {len(cases)} processor chains")


def generate(model, prompt, **kwargs):
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, pad_token_id=eos, **kwargs)
    return out[0, len(prompt):].tolist()


def record_generations():
    prompt = PROMPT
    cases = []
    for fixture, model in fixture_models():
        # No EOS: the full length exercises the processors at every step.
        plain = generate(model, prompt, max_new_tokens=20, eos_token_id=None)
        for settings in [{"repetition_penalty": 1.3}, {"repetition_penalty": 0.7}, {"no_repeat_ngram_size": 2},
                         {"no_repeat_ngram_size": 3, "repetition_penalty": 1.1}]:
            ids = generate(model, prompt, max_new_tokens=20, eos_token_id=None, **settings)
            cases.append({"fixture": fixture, "prompt": prompt, "max_new_tokens": 20, "settings": settings,
                          "ids": ids, "differs_from_greedy": ids != plain})
    # Stop strings need text: the demo checkpoint has the real GPT-2 vocabulary.
    demo = os.path.join(FIXTURES, "demo-gpt2-multiexit")
    tokenizer = AutoTokenizer.from_pretrained(demo)
    model = AutoModelForCausalLM.from_pretrained(demo, torch_dtype=torch.float32)
    model.eval()
    prompt = tokenizer("The benefits of bad advice")["input_ids"]
    free = generate(model, prompt, max_new_tokens=24, eos_token_id=None)
    texts = [tokenizer.decode([t]) for t in free]
    # A stop string across the boundary of tokens 6 and 7, one that is a whole later token, and one
    # inside a token but not at its start.
    across = texts[6][-2:] + texts[7][:2]
    whole = texts[12]
    inner = next((t[1:3] for t in texts if len(t) >= 4), None)
    for stops in [[across], [whole], [inner], [across, whole]]:
        if not stops or None in stops:
            continue
        ids = generate(model, prompt, max_new_tokens=24, eos_token_id=None, stop_strings=stops, tokenizer=tokenizer)
        cases.append({"fixture": "demo-gpt2-multiexit", "prompt": prompt, "max_new_tokens": 24,
                      "settings": {"stop_strings": stops}, "ids": ids, "differs_from_greedy": ids != free})
    json.dump({"cases": cases}, open(os.path.join(OUT, "generation.json"), "w"), indent=1, ensure_ascii=False)
    print(f"  {len(cases)} generations")


def beam_generate(model, prompt, with_scores=False, **kwargs):
    """generate() with beams; every returned sequence's new ids (pad -1 stripped), and their scores."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, pad_token_id=-1,
                             return_dict_in_generate=True, output_scores=True, **kwargs)
    sequences = [[t for t in row[len(prompt):].tolist() if t != -1] for row in out.sequences]
    return (sequences, out.sequences_scores.tolist()) if with_scores else sequences


def upstream_model(fixture, upper, lower):
    """Upstream autocontrastive-gen's model with an ACD plan (exit heads, alpha 0.1)."""
    from autocontrastive_gen.modeling.auto_model import AutoMultiExitModel
    from autocontrastive_gen.modeling.configuration import MultiExitConfiguration
    config = MultiExitConfiguration(use_original_head=False, contrast_layer_indices=(upper, lower))
    model = AutoMultiExitModel.from_pretrained(os.path.join(FIXTURES, fixture), multi_exit_config=config,
                                               torch_dtype=torch.float32)
    model.eval()
    forward = model.forward  # upstream 0.2.0 predates the cache_position argument (see make_fixtures.py)
    model.forward = lambda *a, cache_position=None, **kw: forward(*a, **kw)
    return model


def record_beams():
    prompt = PROMPT
    settings_list = [
        {"num_beams": 4},
        {"num_beams": 4, "early_stopping": True},
        {"num_beams": 4, "early_stopping": "never"},
        {"num_beams": 3, "length_penalty": 0.5, "num_return_sequences": 3},
        {"num_beams": 4, "length_penalty": 2.0, "early_stopping": "never", "num_return_sequences": 2},
        {"num_beams": 4, "length_penalty": -1.0, "num_return_sequences": 4},
        {"num_beams": 4, "no_repeat_ngram_size": 2},
        {"num_beams": 2, "repetition_penalty": 1.3, "min_new_tokens": 5},
    ]
    cases = []
    for fixture, model in fixture_models():
        # A token the search likes as EOS, so that hypotheses end early and EOS rules matter.
        eos = beam_generate(model, prompt, max_new_tokens=16, num_beams=4, eos_token_id=None)[0][3]
        # A second EOS id: the best sequence's 6th token (several EOS ids widen the candidate list).
        second = beam_generate(model, prompt, max_new_tokens=16, num_beams=4, eos_token_id=None)[0][5]
        for settings in settings_list + [{"num_beams": 3, "num_return_sequences": 3, "eos_pair": True}]:
            ends = [eos, second] if settings.pop("eos_pair", False) else eos
            sequences, scores = beam_generate(model, prompt, with_scores=True, max_new_tokens=16, eos_token_id=ends,
                                              **settings)
            cases.append({"fixture": fixture, "plan": "original", "prompt": prompt, "max_new_tokens": 16,
                          "eos_token_id": ends, "settings": settings, "sequences": sequences,
                          "sequence_scores": scores})
    # Beam search under ACD, through upstream's own model (gpt2 and gpt-neo).
    for fixture, upper, lower in [("gpt2-sharded", 4, 1), ("gpt-neo-bin", 4, 2)]:
        model = upstream_model(fixture, upper, lower)
        eos = beam_generate(model, prompt, max_new_tokens=16, num_beams=4, eos_token_id=None)[0][3]
        for settings in [{"num_beams": 4}, {"num_beams": 3, "num_return_sequences": 2, "early_stopping": True}]:
            sequences = beam_generate(model, prompt, max_new_tokens=16, eos_token_id=eos, **settings)
            cases.append({"fixture": fixture, "plan": f"contrast.{upper}.{lower}", "prompt": prompt,
                          "max_new_tokens": 16, "eos_token_id": eos, "settings": settings, "sequences": sequences,
                          "reference": "transformers generate() + upstream autocontrastive-gen"})
    json.dump({"cases": cases}, open(os.path.join(OUT, "beams.json"), "w"), indent=1)
    ended = sum(any(len(s) < 16 for s in c["sequences"]) for c in cases)
    print(f"  {len(cases)} beam searches, {ended} with a hypothesis ended by EOS")


def record_contrastive_and_dola():
    prompt = PROMPT
    cases = []
    for fixture, model in fixture_models():
        plain = generate(model, prompt, max_new_tokens=16, eos_token_id=None)
        n = model.config.num_hidden_layers
        for settings in [{"penalty_alpha": 0.6, "top_k": 4}, {"penalty_alpha": 0.3, "top_k": 6},
                         {"penalty_alpha": 0.6, "top_k": 4, "repetition_penalty": 1.2},
                         {"dola_layers": "low"}, {"dola_layers": "high"}, {"dola_layers": list(range(n))},
                         {"dola_layers": [0, n // 2], "repetition_penalty": 1.2}]:
            ids = generate(model, prompt, max_new_tokens=16, eos_token_id=None, **settings)
            cases.append({"fixture": fixture, "prompt": prompt, "max_new_tokens": 16, "settings": settings,
                          "ids": ids, "differs_from_greedy": ids != plain,
                          "tie_word_embeddings": model.config.tie_word_embeddings})
    json.dump({"cases": cases}, open(os.path.join(OUT, "contrastive_dola.json"), "w"), indent=1)
    print(f"  {len(cases)} contrastive-search and DoLa generations, "
          f"{sum(c['differs_from_greedy'] for c in cases)} differ from greedy")


if __name__ == "__main__":
    torch.set_num_threads(2)
    os.makedirs(OUT, exist_ok=True)
    record_processors()
    record_generations()
    record_beams()
    record_contrastive_and_dola()
