"""layerwise: multi-exit language models (early exit, auto-contrastive decoding) on the layerwise Rust engine.

The API follows upstream autocontrastive-gen and transformers, so that their examples port by changing the
import::

    import layerwise
    from layerwise import MultiExitConfiguration

    config = MultiExitConfiguration(use_original_head=False, contrast_layer_indices=("original", 12))
    model = layerwise.Model.from_pretrained("ibm/gpt2-medium-multiexit", multi_exit_config=config)
    ids = model.tokenizer("The benefits of bad advice")["input_ids"]
    out = model.generate([ids], max_new_tokens=20)       # prompt + new ids, as transformers returns them
    print(model.tokenizer.decode(out[0][len(ids):]))

Everything runs in the engine (no torch); the GIL is released while it computes and Ctrl-C stops a long
generation between steps. Engine errors raise :class:`LayerwiseError` with the engine's message.
"""
from __future__ import annotations

import ast
import json
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _native
from ._native import LayerwiseError

__all__ = ["Model", "MultiExitConfiguration", "Decoder", "Tokenizer", "ModelOutput", "LayerwiseError"]
__version__ = _native.__version__

# transformers' generate() keyword arguments the engine implements (generation_config names), and the ones
# accepted and ignored because they change nothing here.
GENERATION_KWARGS = {
    "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p",
    "repetition_penalty", "no_repeat_ngram_size", "stop_strings", "num_beams", "num_return_sequences",
    "length_penalty", "early_stopping", "penalty_alpha", "dola_layers", "eos_token_id", "seed",
}
IGNORED_KWARGS = {"pad_token_id", "bos_token_id", "output_hidden_states", "use_cache", "return_dict_in_generate",
                  "output_scores", "tokenizer"}


@dataclass
class MultiExitConfiguration:
    """Which exit a model's outputs come from: upstream's ``MultiExitConfiguration``, field by field.

    ``use_original_head``: the model's own LM head. Else ``output_layer_index`` (early exit at that layer) or
    ``contrast_layer_indices`` (an upper and a lower layer, the upper may be ``"original"``; also as the string
    ``"original;12"``) for auto-contrastive decoding with ``alpha`` and ``minimum_candidates``, or with
    ``contrast_function(upper, lower) -> scores`` over two numpy rows of logits (upstream passes torch
    tensors). ``vocab_projection_mode``: ``layer_heads`` (the exit heads), ``logit_lens`` or
    ``conversion_matrices``. ``lm_head_layer_indices`` and ``freeze_parameters`` are training fields, kept so
    that upstream code runs; inference reads the exits from the checkpoint.
    """

    lm_head_layer_indices: Optional[Tuple[int, ...]] = None
    freeze_parameters: bool = False
    use_original_head: bool = True
    output_layer_index: Optional[int] = None
    contrast_layer_indices: Optional[Tuple[Union[int, str], int]] = None
    contrast_function: Optional[Callable[[np.ndarray, np.ndarray], Any]] = None
    vocab_projection_mode: str = "layer_heads"
    alpha: float = 0.1
    minimum_candidates: int = 1

    def __post_init__(self):
        # upstream's string forms (command lines): "24;12", "original;12", "True".
        if isinstance(self.contrast_layer_indices, str):
            self.contrast_layer_indices = tuple(
                idx if idx == "original" else int(idx) for idx in self.contrast_layer_indices.split(";"))
        if isinstance(self.lm_head_layer_indices, str):
            self.lm_head_layer_indices = tuple(int(idx) for idx in self.lm_head_layer_indices.split(";"))
        if isinstance(self.output_layer_index, str):
            self.output_layer_index = int(self.output_layer_index)
        if isinstance(self.use_original_head, str):
            self.use_original_head = ast.literal_eval(self.use_original_head)
        if self.contrast_layer_indices is not None and self.use_original_head:
            raise LayerwiseError("Contradiction in model configuration: trying to use the original LM head but also "
                                 f"to calculate contrast between layers {self.contrast_layer_indices}")

    def get_description(self) -> str:
        if self.use_original_head:
            return "original_head"
        if self.contrast_layer_indices:
            return f"{self.contrast_layer_indices[0]}_vs_{self.contrast_layer_indices[1]}"
        return f"layer_{self.output_layer_index}"

    def _plan(self) -> Dict[str, Any]:
        """The engine's plan arguments."""
        plan: Dict[str, Any] = {"projection": self.vocab_projection_mode, "alpha": self.alpha,
                                "min_candidates": self.minimum_candidates}
        if self.use_original_head:
            plan["mode"] = "original"
        elif self.contrast_layer_indices is not None:
            upper, lower = self.contrast_layer_indices
            plan.update(mode="contrast", upper=str(upper), lower=int(lower))
            if self.contrast_function is not None:
                function = self.contrast_function
                plan["contrast_function"] = lambda u, l: np.asarray(function(u, l), dtype=np.float32).reshape(-1)
        else:
            if self.output_layer_index is None:
                raise LayerwiseError("use_original_head=False needs output_layer_index or contrast_layer_indices")
            plan.update(mode="exit", layer=int(self.output_layer_index))
        return plan


class Tokenizer:
    """The checkpoint's tokenizer, called as transformers' tokenizers are."""

    def __init__(self, native):
        self._native = native

    def __call__(self, text: Union[str, Sequence[str]], **_ignored) -> Dict[str, Any]:
        if isinstance(text, str):
            return {"input_ids": self.encode(text)}
        return {"input_ids": [self.encode(t) for t in text]}

    def encode(self, text: str, add_special_tokens: bool = True, **_ignored) -> List[int]:
        return self._native.encode(text, add_special_tokens)

    def decode(self, ids: Union[int, Sequence[int]], skip_special_tokens: bool = False, **_ignored) -> str:
        ids = [ids] if isinstance(ids, (int, np.integer)) else ids
        return self._native.decode([int(i) for i in ids], skip_special_tokens)

    def batch_decode(self, sequences: Sequence[Sequence[int]], **_ignored) -> List[str]:
        return [self.decode(s) for s in sequences]


@dataclass
class ModelOutput:
    """A forward pass's outputs (numpy, ``[batch, tokens, width]``): ``logits`` of the configured head or plan
    (log-probabilities for a contrast), ``lm_logits`` of the original head, ``exit_logits`` by layer, and
    ``hidden_states`` (embeddings, then every block; the last after the final norm) when asked for."""

    logits: np.ndarray
    lm_logits: Optional[np.ndarray]
    exit_logits: Dict[int, np.ndarray]
    hidden_states: Optional[Tuple[np.ndarray, ...]]


def _prompts(input_ids, attention_mask=None) -> Tuple[List[List[int]], bool]:
    """Prompts as lists of ids, and whether one prompt (not a batch) was given. A 2-D input with an attention
    mask loses its padded positions, as transformers ignores them."""
    if isinstance(input_ids, np.ndarray) or hasattr(input_ids, "tolist"):
        input_ids = input_ids.tolist()
    if attention_mask is not None and hasattr(attention_mask, "tolist"):
        attention_mask = attention_mask.tolist()
    if len(input_ids) > 0 and isinstance(input_ids[0], (int, np.integer)):
        return [[int(i) for i in input_ids]], True
    prompts = [[int(i) for i in row] for row in input_ids]
    if attention_mask is not None:
        prompts = [[i for i, keep in zip(row, mask) if keep] for row, mask in zip(prompts, attention_mask)]
    return prompts, False


class Model:
    """A multi-exit (or plain) GPT-2, GPT-Neo or Llama checkpoint on the engine."""

    def __init__(self, native, config: MultiExitConfiguration):
        self._native = native
        self.multi_exit_config = config
        self.tokenizer = Tokenizer(native) if native.has_tokenizer else None

    @classmethod
    def from_pretrained(cls, model_name_or_path, multi_exit_config: Optional[MultiExitConfiguration] = None,
                        dtype: Optional[str] = None, device: str = "cpu", adapter=None) -> "Model":
        """Loads a checkpoint directory or Hub id, as upstream's ``AutoMultiExitModel.from_pretrained``.

        ``dtype``: f32, f16 or bf16 weights (default: as stored). ``device``: ``cpu``, ``cuda`` / ``cuda:N`` (the
        engine's CUDA kernels through the driver; an error naming what is missing when there is no driver or
        device), or ``auto`` (the first GPU if a driver reports one, else the CPU; ``model.device`` says which).
        ``adapter``: a PEFT adapter folder (LoRA, (IA)^3, prompt tuning).
        """
        config = multi_exit_config if multi_exit_config is not None else MultiExitConfiguration()
        plan = config._plan()
        native = _native.Model.load(str(model_name_or_path), dtype=dtype, device=str(device or "cpu"),
                                    adapter=None if adapter is None else str(adapter), **plan)
        return cls(native, config)

    # transformers-style attributes
    @property
    def device(self) -> str:
        """What the model runs on: ``cpu``, or the GPU's name and memory."""
        return self._native.device

    @property
    def vocab_size(self) -> int:
        return self._native.vocab_size

    @property
    def num_layers(self) -> int:
        return self._native.num_layers

    @property
    def exit_layers(self) -> List[int]:
        return self._native.exit_layers

    @property
    def adapter(self) -> Optional[str]:
        return self._native.adapter

    def __call__(self, input_ids, attention_mask=None, output_hidden_states: bool = False,
                 exits: Optional[Sequence[int]] = None) -> ModelOutput:
        """Every position's outputs for one prompt or a batch (each prompt runs on its own; a batch of unequal
        lengths gives lists instead of stacked arrays)."""
        prompts, _ = _prompts(input_ids, attention_mask)
        want_exits = list(self.exit_layers if exits is None else exits)
        runs = [self._native.forward(p, logits=True, exits=want_exits, hidden_states=output_hidden_states,
                                     plan=True) for p in prompts]
        same = len({len(p) for p in prompts}) == 1

        def stack(arrays):
            return np.stack(arrays) if same else list(arrays)

        hidden = None
        if output_hidden_states:
            hidden = tuple(stack([r["hidden_states"][i] for r in runs]) for i in range(len(runs[0]["hidden_states"])))
        return ModelOutput(
            logits=stack([r["plan"] for r in runs]),
            lm_logits=stack([r["logits"] for r in runs]),
            exit_logits={layer: stack([r["exits"][layer] for r in runs]) for layer in want_exits},
            hidden_states=hidden,
        )

    def _config(self, kwargs: Dict[str, Any]) -> str:
        unknown = set(kwargs) - GENERATION_KWARGS - IGNORED_KWARGS
        if unknown:
            raise LayerwiseError(f"generate(): unsupported argument(s) {sorted(unknown)}; supported: "
                                 f"{sorted(GENERATION_KWARGS)}")
        fields = {k: v for k, v in kwargs.items() if k in GENERATION_KWARGS and v is not None}
        if isinstance(fields.get("eos_token_id"), (int, np.integer)):
            fields["eos_token_id"] = [int(fields["eos_token_id"])]
        return json.dumps(fields)

    def generate(self, input_ids=None, attention_mask=None, batch_size: int = 16, **kwargs) -> List[List[int]]:
        """transformers' ``generate``: the prompt and the new ids of every returned sequence (``num_return_sequences``
        per prompt, in order). ``input_ids``: one list of ids, a list of lists or a 2-D array (with
        ``attention_mask``, padded positions are dropped), or text (a string or a list of them, encoded with the
        checkpoint's tokenizer; ids still come back). Keyword arguments have transformers' names and
        semantics (greedy, sampling with ``seed``, beam search, contrastive search, DoLa, processors, stop strings).
        A batch runs through the engine's continuous-batching scheduler, ``batch_size`` sequences per step."""
        if isinstance(input_ids, str) or (isinstance(input_ids, (list, tuple)) and input_ids
                                          and all(isinstance(t, str) for t in input_ids)):
            if self.tokenizer is None:
                raise LayerwiseError("the checkpoint has no tokenizer; give token ids to generate()")
            texts = [input_ids] if isinstance(input_ids, str) else list(input_ids)
            input_ids = [self.tokenizer.encode(t) for t in texts]
        prompts, _ = _prompts(input_ids, attention_mask)
        results = self._native.generate(prompts, self._config(kwargs), batch_size)
        return [prompt + list(new) for prompt, (sequences, _) in zip(prompts, results) for new in sequences]

    def generate_text(self, prompt: Union[str, Sequence[str]], **kwargs) -> Union[str, List[str]]:
        """The new text for one prompt (or a list of them)."""
        if self.tokenizer is None:
            raise LayerwiseError("the checkpoint has no tokenizer; give token ids to generate()")
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        ids = [self.tokenizer.encode(p) for p in prompts]
        batch_size = kwargs.pop("batch_size", 16)
        results = self._native.generate(ids, self._config(kwargs), batch_size)
        texts = [self.tokenizer.decode(sequences[0] if sequences else []) for sequences, _ in results]
        return texts[0] if single else texts

    def stream(self, input_ids, **kwargs) -> Iterator[int]:
        """The new ids of one prompt as the engine chooses them (greedy and sampling stream token by token; beam
        search's best sequence comes at its end)."""
        prompts, _ = _prompts(input_ids)
        if len(prompts) != 1:
            raise LayerwiseError("stream() takes one prompt")
        config = self._config(kwargs)
        tokens: "queue.Queue" = queue.Queue()
        done = object()
        failure: List[BaseException] = []

        def hand_over(_index, ids) -> bool:
            for token in ids:
                tokens.put(token)
            return False  # go on: only the engine's own rules end a stream

        def run():
            try:
                self._native.generate(prompts, config, 1, hand_over)
            except BaseException as e:  # handed to the consumer
                failure.append(e)
            finally:
                tokens.put(done)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        while True:
            token = tokens.get()
            if token is done:
                break
            yield token
        worker.join()
        if failure:
            raise failure[0]

    def logit_lens(self, input_ids, decoder: str = "final", subblocks: bool = False, top_k: int = 5) -> Dict[str, Any]:
        """The logit lens of one prompt: every layer's prediction at every position (``rows``, ``top_ids``,
        ``top_probs``, ``entropy``, ``kl_to_final``, ...; the fields of ``layerwise lens --json``). ``decoder``:
        ``final`` (the final norm and LM head), ``exits``, ``converted``, or blocks to run first (``h.11``)."""
        prompts, _ = _prompts(input_ids)
        return json.loads(self._native.logit_lens(prompts[0], decoder, subblocks, top_k))

    def activations(self, input_ids, points: Sequence[str]) -> Dict[str, np.ndarray]:
        """Activations of one prompt at named points (``embed``, ``h.5``, ``h.5.attn``, ``h.5.mlp``, ``h.5.ln_1``,
        ... in the checkpoint's own names), each ``[tokens, width]``."""
        prompts, _ = _prompts(input_ids)
        return self._native.inspect(prompts[0], list(points), [])[0]

    def attentions(self, input_ids, layers: Optional[Sequence[int]] = None) -> Dict[int, np.ndarray]:
        """Attention probabilities of one prompt, ``{block: [heads, tokens, tokens]}`` (every block by default)."""
        prompts, _ = _prompts(input_ids)
        blocks = list(range(self.num_layers)) if layers is None else [int(b) for b in layers]
        return self._native.inspect(prompts[0], [], blocks)[1]

    def decoder(self, cache_tokens: Optional[int] = None, block_size: int = 16) -> "Decoder":
        """A step-by-step decoder over a paged KV cache (``add_sequence``, ``step``, ``append``, ``fork``,
        ``release``, ``tokens``), under this model's exit plan."""
        return Decoder(self, cache_tokens, block_size)


class Decoder(_native.Decoder):
    """Step-by-step decoding: ``add_sequence(ids) -> handle``; ``step() -> {handle: scores}`` runs every pending
    token in one batched forward; ``append(handle, id)``; ``fork(handle)`` shares the cache blocks (copy on
    write); ``release(handle)``; ``tokens(handle)``."""

    def __new__(cls, model: Model, cache_tokens: Optional[int] = None, block_size: int = 16):
        return super().__new__(cls, model._native, cache_tokens, block_size)
