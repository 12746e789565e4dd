"""lm-evaluation-harness model ``layerwise``: the harness's three request types on the engine, under any exit plan.

With the wheel installed, the harness finds the model by name (``layerwise_lm_eval.pth`` registers it when the
harness loads its models, see ``_layerwise_lm_eval_hook.py``)::

    lm_eval --model layerwise \\
        --model_args pretrained=DIR,use_original_head=False,contrast_layer_indices='original;12' --tasks lambada_openai

as upstream autocontrastive-gen's ``multi_exit_gpt`` model does for harness 0.3. ``python -m layerwise.harness`` is
the same command without the hook. The model arguments are upstream's ``MultiExitConfiguration`` fields
(``use_original_head``, ``output_layer_index``, ``contrast_layer_indices``, ``vocab_projection_mode``) plus
``alpha``, ``minimum_candidates``, ``dtype`` (float32/float16/bfloat16/auto), ``adapter``, ``max_length`` and
``prefix_token_id``.

The semantics are the harness's ``HFLM`` (lm-eval 0.4.8), on which the numbers are tested to be equal:

* ``loglikelihood``: ``TemplateLM``'s context/continuation split (trailing spaces of the context move to the
  continuation; the pair encoded whole and the context alone, no special tokens; an empty context reads the
  prefix token), the pair cut to ``max_length + 1`` tokens from the left, ``(sum of log-probabilities, greedy)``.
  A contrast plan's scores are normalised with a log-softmax, as the harness normalises what a model returns.
* ``loglikelihood_rolling``: disjoint windows of ``max_length`` tokens, the first after the prefix token.
* ``generate_until``: requests grouped by their generation arguments, the context cut from the left to
  ``max_length - max_gen_toks`` tokens, greedy unless the task asks to sample, stopped per request when a
  stop sequence appears in the decoded last ``len(encode(stop)) + 2`` new tokens (the harness's
  ``MultiTokenEOSCriteria``; the end-of-text token's text is always one), then cut at the first stop sequence.

The prefix token is ``prefix_token_id`` if given, else the config's ``bos_token_id``, else its end-of-text token
(the harness takes the tokenizer's BOS; in every supported family the config names the same token).
``max_length`` is the model's context unless given. Requests are scored longest first, as the harness orders
them, one forward pass each; generation requests of a group run together through the continuous-batching
scheduler (``batch_size`` sequences a step; ``auto`` means 16).
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple, Union

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import MODEL_REGISTRY, register_model
from lm_eval.models.utils import handle_stop_sequences

from . import LayerwiseError, Model, MultiExitConfiguration

__all__ = ["LayerwiseLM"]

DTYPES = {"auto": None, "float32": "f32", "float16": "f16", "half": "f16", "bfloat16": "bf16",
          "f32": "f32", "f16": "f16", "bf16": "bf16"}


class LayerwiseLM(TemplateLM):
    """A multi-exit checkpoint as the harness's language model."""

    def __init__(self, pretrained: str, use_original_head: Union[bool, str] = True,
                 output_layer_index: Optional[int] = None, contrast_layer_indices: Union[str, Tuple, None] = None,
                 vocab_projection_mode: str = "layer_heads", alpha: float = 0.1, minimum_candidates: int = 1,
                 dtype: Optional[str] = "auto", device: Optional[str] = "cpu", batch_size: Union[int, str] = 1,
                 max_batch_size: Optional[int] = None, max_length: Optional[int] = None,
                 prefix_token_id: Optional[int] = None, adapter: Optional[str] = None, **unused: Any):
        super().__init__()
        if unused:
            raise LayerwiseError(f"layerwise model: unknown model argument(s) {sorted(unused)}")
        if dtype is not None and str(dtype) not in DTYPES:
            raise LayerwiseError(f"layerwise model: dtype `{dtype}` is not one of {sorted(DTYPES)}")
        config = MultiExitConfiguration(use_original_head=use_original_head, output_layer_index=output_layer_index,
                                        contrast_layer_indices=contrast_layer_indices,
                                        vocab_projection_mode=vocab_projection_mode, alpha=float(alpha),
                                        minimum_candidates=int(minimum_candidates))
        self.model = Model.from_pretrained(pretrained, multi_exit_config=config,
                                           dtype=None if dtype is None else DTYPES[str(dtype)],
                                           device=device or "cpu", adapter=adapter)
        if self.model.tokenizer is None:
            raise LayerwiseError(f"layerwise model: {pretrained} has no tokenizer, which the harness needs")
        native = self.model._native
        self._max_length = native.max_positions if max_length is None else int(max_length)
        if not 1 <= self._max_length <= native.max_positions:
            raise LayerwiseError(f"layerwise model: max_length {max_length} is not within 1..={native.max_positions}")
        eos = native.eos_token_ids
        if not eos:
            raise LayerwiseError(f"layerwise model: {pretrained}'s config names no eos_token_id")
        self._eot = eos[0]
        self._prefix = next(t for t in (prefix_token_id, native.bos_token_id, self._eot) if t is not None)
        size = str(batch_size)
        self.batch_size = 16 if size.startswith("auto") else int(size)
        if max_batch_size is not None and size.startswith("auto"):
            self.batch_size = min(self.batch_size, int(max_batch_size))

    # --- what TemplateLM asks for --------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return 256

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **_: Any) -> List[int]:
        # Causal models encode without special tokens (HFLM's default, add_bos_token=False).
        return self.model.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.model.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_: Any) -> List[Tuple[float, bool]]:
        # Longest first, as the harness orders them; answers in the requests' order.
        order = sorted(range(len(requests)), key=lambda i: (-len(requests[i][1] + requests[i][2]),
                                                            tuple(requests[i][1] + requests[i][2])))
        pairs = [(list(requests[i][1]), list(requests[i][2])) for i in order]
        scores = self.model._native.loglikelihood(pairs, self._max_length)
        out: List[Tuple[float, bool]] = [(0.0, False)] * len(requests)
        for i, (loglikelihood, greedy) in zip(order, scores):
            out[i] = (loglikelihood, greedy)
            self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        documents = [self.tok_encode(string) for (string,) in (req.args for req in requests)]
        scores = self.model._native.loglikelihood_rolling(documents, self._prefix, self._max_length)
        for req, score in zip(requests, scores):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), score)
        return list(scores)

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        results: List[Optional[str]] = [None] * len(requests)
        groups: Dict[str, List[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        eos_text = self.tok_decode([self._eot], skip_special_tokens=False)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen_toks = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            max_context = self._max_length - max_gen_toks
            if max_context <= 0:
                raise LayerwiseError(f"max_gen_toks {max_gen_toks} must be less than the model's context "
                                     f"{self._max_length}")
            members.sort(key=lambda i: (-len(self.tok_encode(requests[i].args[0])), requests[i].args[0]))
            prompts = [self.tok_encode(requests[i].args[0])[-max_context:] for i in members]
            texts = self._generate(prompts, until, max_gen_toks, kwargs)
            for i, text in zip(members, texts):
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return [r if r is not None else "" for r in results]

    # --- generation ------------------------------------------------------------------------------------------
    def _generate(self, prompts: List[List[int]], until: List[str], max_gen_toks: int,
                  kwargs: Dict[str, Any]) -> List[str]:
        """Greedy (or the task's sampling) generation of every prompt, stopped as the harness stops it."""
        kwargs = dict(kwargs)
        max_length = kwargs.pop("max_length", None)
        # HFLM: temperature 0 (the default) without do_sample means greedy.
        temperature = kwargs.pop("temperature", 0.0)
        do_sample = kwargs.pop("do_sample", None)
        if do_sample is None and temperature == 0.0:
            do_sample = False
        fields: Dict[str, Any] = dict(kwargs, do_sample=bool(do_sample))
        if not (do_sample is False and temperature == 0.0):
            fields["temperature"] = temperature
        lookbacks = [(stop, len(self.tok_encode(stop)) + 2) for stop in until]
        generated: List[List[int]] = [[] for _ in prompts]

        def stopped(index: int, ids: List[int]) -> bool:
            # MultiTokenEOSCriteria: the stop text in the decoded last len(encode(stop)) + 2 new tokens.
            generated[index].extend(ids)
            new = generated[index]
            return any(stop in self.model.tokenizer.decode(new[-n:]) for stop, n in lookbacks)

        # One call per distinct budget: HFLM's max_length = longest context + max_gen_toks (or the task's).
        texts: List[str] = []
        new_tokens = [max_gen_toks if max_length is None else int(max_length) - len(p) for p in prompts]
        config = self.model._config(dict(fields, max_new_tokens=max(new_tokens)))
        if len(set(new_tokens)) == 1:
            outputs = self.model._native.generate(prompts, config, self.batch_size, stopped)
        else:
            outputs = []
            for k, prompt in enumerate(prompts):
                one = self.model._config(dict(fields, max_new_tokens=new_tokens[k]))
                outputs.extend(self.model._native.generate([prompt], one, 1,
                                                           lambda _i, ids, k=k: stopped(k, ids)))
        for sequences, _reason in outputs:
            text = self.tok_decode(sequences[0] if sequences else [])
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            texts.append(text)
        return texts


if "layerwise" not in MODEL_REGISTRY:
    register_model("layerwise")(LayerwiseLM)


def main() -> None:
    """``lm_eval``'s command line with the ``layerwise`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
