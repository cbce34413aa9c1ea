"""Built-in pseudo-target sources: where training sequences come from."""

from __future__ import annotations

from distillkit import hookimpl
from distillkit.batch import ExampleBatch, TrainBatch, collate
from distillkit.components import PseudoTargetSource, SourceFactory
from distillkit.run import Run


def dataset_responses(run: Run) -> PseudoTargetSource:
    """``[x ‖ y*]`` with the dataset's reference response."""
    pad_id = run.tokenizer.pad_token_id

    def make_batch(examples: ExampleBatch) -> TrainBatch:
        return collate([e.prompt_ids for e in examples], [e.response_ids for e in examples], pad_id)

    return make_batch


@hookimpl
def distillkit_register_sources() -> list[SourceFactory]:
    return [SourceFactory("dataset", "the dataset's reference responses", dataset_responses)]
