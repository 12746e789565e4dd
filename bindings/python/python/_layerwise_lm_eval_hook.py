"""Makes ``lm_eval --model layerwise`` work: registers layerwise's model when lm-evaluation-harness loads its own.

lm-evaluation-harness 0.4 finds models only in its registry, which ``lm_eval.models`` fills when it is imported;
it has no plugin entry points. ``layerwise_lm_eval.pth`` runs this module at interpreter start. It only adds one
finder to ``sys.meta_path``, which answers nothing but the import of ``lm_eval.models``: that module is loaded
as usual, then ``layerwise.harness`` is imported, which registers the model. Nothing is imported before the
harness is. ``LAYERWISE_LM_EVAL_HOOK=0`` turns the hook off (``python -m layerwise.harness`` still works).
"""
import os
import sys

_TARGET = "lm_eval.models"


class _RegisterAfterHarnessModels:
    """A meta-path finder that wraps the loader of ``lm_eval.models`` to import ``layerwise.harness`` after it."""

    def find_spec(self, name, path=None, target=None):
        if name != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run_module = loader.exec_module

        def exec_module(module):
            run_module(module)
            try:
                import layerwise.harness  # noqa: F401  (registers the model)
            except Exception as error:  # the harness works without it; say why the model is missing
                print(f"layerwise: the lm-eval model `layerwise` is not registered: {error}", file=sys.stderr)

        # The loader is this import's own (file finders make one per spec): wrapping it touches nothing else.
        loader.exec_module = exec_module
        return spec


if os.environ.get("LAYERWISE_LM_EVAL_HOOK", "1") != "0" and not any(
        isinstance(f, _RegisterAfterHarnessModels) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterHarnessModels())
