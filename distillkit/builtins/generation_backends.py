"""The built-in generation backends: ``transformers``, the KV-cached sampler of
:mod:`distillkit.engine.sampling` (the default, and the reference the tests
hold every backend to), and ``vllm``, registered so that a recipe can name it
and get the reason it cannot run yet."""

from __future__ import annotations

from typing import Any

from distillkit.api import GenerationBackend, hookimpl
from distillkit.engine.sampling import sample

VLLM_MISSING = ("the vLLM backend is not implemented yet: its weight synchronisation after each optimizer step "
                "and its row-keyed seeds need a GPU machine to build and test (issue 17, section 4); use "
                "generation.backend = 'transformers'")


def vllm_sample(*args: Any, **kwargs: Any) -> list[list[int]]:
    raise NotImplementedError(VLLM_MISSING)


@hookimpl
def distillkit_register_generation_backends() -> list[GenerationBackend]:
    return [GenerationBackend("transformers", "KV-cached ancestral sampling with transformers models, row-keyed "
                              "noise (the reference)", sample),
            GenerationBackend("vllm", "vLLM engine on GPUs (not implemented yet)", vllm_sample,
                              unavailable=lambda: VLLM_MISSING)]
