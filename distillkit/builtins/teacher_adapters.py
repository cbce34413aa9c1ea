"""Built-in teacher adapters: how a run uses the teacher model.

Every adapter keeps the teacher's own weights frozen; ``adapted=False``
gives the plain (prompt-free / adapter-free) teacher, which PromptKD's
regulariser needs.  Each declares its options (a dataclass, checked when the
recipe loads) and, for the memory planner, what it trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from distillkit.api import (
    AdapterFootprint,
    DistillkitError,
    PlanContext,
    StepContext,
    TeacherAdapterFactory,
    TrainBatch,
    hookimpl,
    require,
)
from distillkit.engine.prefix import prefix_embeddings, with_prefix_slots

PROMPT_INIT_TEXT = "Suppose you are a student."
PromptInit = Literal["text", "padding", "random"]


@dataclass(frozen=True)
class SoftPromptOptions:
    """``length`` m vectors, initialised as ``init`` says (:func:`initial_prompt`);
    ``train_mode_for_grad``: see :class:`SoftPromptTeacher`."""

    length: int = 7
    init: PromptInit = "text"
    init_text: str = PROMPT_INIT_TEXT
    train_mode_for_grad: bool = True

    def __post_init__(self) -> None:
        require(self.length >= 1, "length", "be >= 1", self.length)
        # checked on the text, not its tokens: a BOS alone is no init text
        require(self.init != "text" or bool(self.init_text.strip()), "init_text",
                "be non-empty text when the prompt starts from text", self.init_text)


@dataclass(frozen=True)
class LoraOptions:
    """peft's ``LoraConfig`` (r, lora_alpha, lora_dropout, target_modules;
    None: peft's default modules for the model type)."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None

    def __post_init__(self) -> None:
        require(self.rank >= 1, "rank", "be >= 1", self.rank)
        require(self.alpha > 0, "alpha", "be > 0", self.alpha)
        require(0 <= self.dropout < 1, "dropout", "be in [0, 1)", self.dropout)


class FrozenTeacher:
    """The teacher as loaded: eval mode, no gradients, weights never change."""

    extra_positions = 0  # positions the adapter adds in front of every sequence

    def __init__(self, model: torch.nn.Module, run: StepContext) -> None:
        self.model = model.eval().requires_grad_(False)

    def logits(self, batch: TrainBatch, *, grad: bool = False, adapted: bool = True) -> torch.Tensor:
        """(B, T-1, V) next-token logits on the same ids and mask as the student."""
        with torch.set_grad_enabled(grad):
            out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        return out.logits[:, :-1]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return []

    def sampling_inputs(self) -> tuple[torch.nn.Module, torch.Tensor | None]:
        """The model to sample from and the embeddings to prepend, if any."""
        return self.model, None


class SoftPrompt(torch.nn.Module):
    """m trainable vectors (m, d) in fp32, prepended to the teacher's input embeddings."""

    def __init__(self, initial: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(initial.detach().clone().float())


def initial_prompt(model: torch.nn.Module, tokenizer: Any, length: int, init: PromptInit, text: str) -> torch.Tensor:
    """(length, d) initial soft prompt (PromptKD appendix D).

    ``text``: embeddings of ``text``'s tokens *with* the tokenizer's special
    tokens (so OPT's ``</s>`` / Llama's ``<s>`` BOS is row 0; GPT-2 adds
    none), truncated to ``length`` or cycled from the beginning when shorter,
    as gmkim-ai/PromptKD ``utils.py`` ``get_teacher_model`` (prompt_init:
    ``tokenizer(args.prompt_init_text)["input_ids"]``, repeated
    ``ceil(prompt_len / n)`` times, cut to ``prompt_len``); ``padding``: the
    pad token's embedding everywhere; ``random``: Gaussian with the embedding
    matrix's std.
    """
    embeddings = model.get_input_embeddings().weight.detach()
    if init == "text":
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        return embeddings[[ids[i % len(ids)] for i in range(length)]]
    if init == "padding":
        return embeddings[[tokenizer.pad_token_id] * length]
    generator = torch.Generator().manual_seed(0)  # "random"
    return torch.randn((length, embeddings.shape[1]), generator=generator).to(embeddings) * embeddings.float().std()


class SoftPromptTeacher(FrozenTeacher):
    """The frozen teacher with a trainable soft prompt P (PromptKD).

    The prompt takes positions 0..m-1; logits at those positions are dropped
    so the result aligns with the student's.  With ``train_mode_for_grad``
    the teacher runs in train mode (dropout on) for gradient-carrying passes,
    as in the original code; targets are computed in eval mode.
    ``options``: :class:`SoftPromptOptions`.
    """

    def __init__(self, model: torch.nn.Module, run: StepContext, **options: Any) -> None:
        super().__init__(model, run)
        opts = SoftPromptOptions(**options)
        self.prompt = SoftPrompt(initial_prompt(model, run.tokenizer, opts.length, opts.init, opts.init_text))
        self.train_mode_for_grad = opts.train_mode_for_grad
        self.extra_positions = opts.length
        self.max_positions = getattr(model.config, "max_position_embeddings", None)

    def logits(self, batch: TrainBatch, *, grad: bool = False, adapted: bool = True) -> torch.Tensor:
        if not adapted:
            return super().logits(batch)
        length = self.prompt.weight.shape[0]
        if self.max_positions is not None and batch.input_ids.shape[1] + length > self.max_positions:
            raise DistillkitError(
                f"a {batch.input_ids.shape[1]}-token sequence plus the {length}-token soft prompt exceeds the "
                f"teacher's {self.max_positions} positions; lower data.max_length to {self.max_positions - length}")
        input_ids, mask = with_prefix_slots(batch.input_ids, batch.attention_mask, length)
        self.model.train(grad and self.train_mode_for_grad)
        try:
            with torch.set_grad_enabled(grad), prefix_embeddings(self.model, self.prompt.weight):
                out = self.model(input_ids=input_ids, attention_mask=mask)
        finally:
            self.model.eval()
        return out.logits[:, length:-1]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [self.prompt.weight]

    def checkpoint_modules(self) -> list[torch.nn.Module]:
        return [self.prompt]

    def sampling_inputs(self) -> tuple[torch.nn.Module, torch.Tensor | None]:
        return self.model, self.prompt.weight.detach()

    def save(self, folder: Path) -> None:
        """The prompt as peft's PROMPT_TUNING adapter (``adapter_config.json``,
        ``adapter_model.safetensors`` with ``prompt_embeddings``, (m, d) fp32),
        so that ``PeftModel.from_pretrained(teacher, folder)`` prepends it;
        ``base_model_name_or_path``: the folder or hub id the teacher was loaded from."""
        from peft import PromptTuningConfig

        prompt = self.prompt.weight.detach().cpu().contiguous()
        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prompt.shape[0], token_dim=prompt.shape[1],
                                    num_transformer_submodules=1, inference_mode=True,
                                    base_model_name_or_path=getattr(self.model, "name_or_path", "") or None)
        config.save_pretrained(folder)
        save_file({"prompt_embeddings": prompt}, folder / "adapter_model.safetensors", metadata={"format": "pt"})


class _LoraState:
    """Checkpoints only the LoRA weights of a peft model."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, state)


class LoraTeacher(FrozenTeacher):
    """The frozen teacher with trainable LoRA matrices (PromptKD's ablation,
    via peft); ``options``: :class:`LoraOptions`."""

    def __init__(self, model: torch.nn.Module, run: StepContext, **options: Any) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers.pytorch_utils import Conv1D

        opts = LoraOptions(**options)
        targets = lora_targets(model, opts)
        config = LoraConfig(r=opts.rank, lora_alpha=opts.alpha, lora_dropout=opts.dropout,
                            target_modules=opts.target_modules, task_type="CAUSAL_LM",
                            # GPT-2's Conv1D stores its weight (in, out); peft would switch this on with a warning
                            fan_in_fan_out=bool(targets) and all(isinstance(m, Conv1D) for m in targets))
        super().__init__(model, run)
        self.model = get_peft_model(model, config)
        self.model.eval()

    def logits(self, batch: TrainBatch, *, grad: bool = False, adapted: bool = True) -> torch.Tensor:
        if adapted:
            return super().logits(batch, grad=grad)
        with self.model.disable_adapter():
            return super().logits(batch)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def checkpoint_modules(self) -> list[Any]:
        return [_LoraState(self.model)]

    def save(self, folder: Path) -> None:
        self.model.save_pretrained(folder)


# --- memory footprints ------------------------------------------------------------


def soft_prompt_footprint(plan: PlanContext, options: SoftPromptOptions) -> AdapterFootprint:
    """m x d trainable values, m more positions per teacher sequence, and
    gradients that reach the teacher's inputs only."""
    hidden = plan.teacher.hidden
    return AdapterFootprint(trainable=options.length * hidden, note=f"soft prompt {options.length} x {hidden}",
                            extra_positions=options.length, gradients_to_inputs_only=True,
                            dropout=options.train_mode_for_grad)


def lora_targets(model: torch.nn.Module, options: LoraOptions) -> list[torch.nn.Module]:
    """The linear layers LoRA adapts: those named by ``target_modules``, else
    by peft's default modules for the model type."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    from transformers.pytorch_utils import Conv1D

    names = options.target_modules or TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(
        model.config.model_type, [])
    return [module for name, module in model.named_modules()
            if name.split(".")[-1] in names and isinstance(module, (torch.nn.Linear, Conv1D))]


def lora_footprint(plan: PlanContext, options: LoraOptions) -> AdapterFootprint:
    """r (in + out) values per adapted linear layer (peft's A: r x in, B:
    out x r), counted on the teacher built on the meta device."""
    count = sum(options.rank * sum(module.weight.shape) for module in lora_targets(plan.meta_teacher(), options))
    return AdapterFootprint(trainable=count, note=f"LoRA rank {options.rank}: {count:,} values")


@hookimpl
def distillkit_register_teacher_adapters() -> list[TeacherAdapterFactory]:
    return [
        TeacherAdapterFactory("frozen", "the teacher as loaded, without gradients", FrozenTeacher),
        TeacherAdapterFactory("soft_prompt", "frozen teacher + trainable soft prompt (PromptKD)", SoftPromptTeacher,
                              options=SoftPromptOptions, footprint=soft_prompt_footprint),
        TeacherAdapterFactory("lora", "frozen teacher + trainable LoRA (peft)", LoraTeacher, options=LoraOptions,
                              footprint=lora_footprint),
    ]
