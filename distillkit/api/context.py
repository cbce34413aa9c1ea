"""What a stage loss and a source may call: the step context.

The trainer passes one :class:`StepContext` (``run``) to every stage loss
``loss(run, batch)``, source factory ``build(run, **options)`` and teacher
adapter factory ``build(teacher, run, **options)``.  Shapes: B batch, T
positions, V the tokenizer's vocabulary; every loss helper averages over the
batch's response tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from distillkit.api.batch import (
        CappedEnding,
        ExampleBatch,
        LossTerm,
        ResponseLogits,
        TokenizedExample,
        TopKSignal,
        TrainBatch,
    )
    from distillkit.api.components import TeacherAdapter
    from distillkit.config import RunConfig


class SamplerRule(Protocol):
    """A per-token intervention in the shared sampler (``run.sample(...,
    guide_model=..., rule=...)``): returns the tokens (B,) to keep, from the
    sampling model's and the guide model's processed next-token scores
    (B, V) (log-probabilities up to a constant; ``-inf`` where filtered) and
    ``draw(scores, stream=0)``, which draws tokens (B,) from any scores (B, V)
    with this token's noise (``stream`` s > 0: noise independent of stream 0).
    The rule draws even the sampling model's proposal itself (``draw(scores)``),
    so a rule that does not need one spends no noise on it.  Rows already
    finished are overwritten with padding afterwards; both models are then fed
    the returned tokens, so their KV caches hold the final sequence."""

    def __call__(self, scores: torch.Tensor, guide_scores: torch.Tensor,
                 draw: Callable[..., torch.Tensor]) -> torch.Tensor: ...


class StepContext(Protocol):
    """The live run as a method sees it.

    - ``config``: the assembled run (``config.recipe``, ``config.training``);
      ``options``: the method's validated options (its ``[methods.NAME]`` section).
    - ``step``: k, optimizer steps done so far (0-based); ``total_steps``: K.
    - ``student``, ``tokenizer``; ``teacher``: the teacher adapter, or None.
    - ``train_examples``: the tokenized training set (for sources that
      pre-generate); ``teacher_id``: names the teacher checkpoint (cache keys).
    - ``process_index`` / ``num_processes``: this process in a multi-process
      run (sources that collect data themselves take their share).
    """

    config: RunConfig
    student: torch.nn.Module
    tokenizer: Any
    teacher: TeacherAdapter | None
    step: int
    total_steps: int
    train_examples: list[TokenizedExample]
    teacher_id: str
    process_index: int
    num_processes: int

    @property
    def options(self) -> Any: ...

    @property
    def vocab_size(self) -> int:
        """The tokenizer's size; logits are sliced to it (padded output rows)."""

    def student_logits(self, batch: TrainBatch) -> torch.Tensor:
        """Student next-token logits (B, T-1, V) aligned with ``batch.labels``, at every position (prefer
        :meth:`student_response_logits` when only the loss helpers read them)."""

    def student_response_logits(self, batch: TrainBatch) -> ResponseLogits:
        """The student's logits at the response positions (``batch.label_mask``), unmaterialised: the
        loss helpers compute them a chunk at a time, and no other position reaches the output layer."""

    def teacher_logits(self, batch: TrainBatch, *, grad: bool = False, adapted: bool = True) -> torch.Tensor:
        """Teacher next-token logits (B, T-1, V); no gradient unless ``grad``;
        ``adapted=False`` gives the plain teacher (no soft prompt / LoRA).
        With ``[teacher_signal] alignment`` the teacher has its own tokenizer:
        ``batch`` must be in its tokens and V is its vocabulary."""

    def teacher_response_logits(self, batch: TrainBatch, *, grad: bool = False, adapted: bool = True
                                ) -> ResponseLogits:
        """:meth:`teacher_logits` at the response positions, unmaterialised like
        :meth:`student_response_logits`."""

    def teacher_signal(self, batch: TrainBatch) -> ResponseLogits | TopKSignal:
        """What the teacher says about the batch, for a divergence: its cached
        top-k signal (:class:`~distillkit.api.TopKSignal`) when the run reads
        one (``[teacher_signal] top_k``, for a method that declares
        ``Method(reads_teacher_signal=True)``); with ``[teacher_signal]
        alignment``, the signal of a teacher with its own tokenizer over the
        student's vocabulary, computed at each call (with ``valid``); else
        :meth:`teacher_response_logits`."""

    def cross_entropy(self, logits: torch.Tensor | ResponseLogits, batch: TrainBatch) -> torch.Tensor:
        """Negative log-likelihood of the batch's response tokens (nats per token)."""

    def divergence(self, name: str, trainable: torch.Tensor | ResponseLogits,
                   target: torch.Tensor | ResponseLogits | TopKSignal, batch: TrainBatch,
                   *, temperature: float = 1.0, **params: float) -> torch.Tensor:
        """Registered divergence ``name`` between trainable logits (dense (B, T-1, V) or response logits)
        and a target (the same, or a top-k signal, then on its k + 1 outcomes, see
        :func:`~distillkit.engine.losses.masked_token_divergences`), averaged over response tokens (nats
        per token).  The target gets a gradient only if it carries one."""

    def token_divergences(self, name: str, trainable: torch.Tensor | ResponseLogits,
                          target: torch.Tensor | ResponseLogits | TopKSignal, batch: TrainBatch, *,
                          temperature: float = 1.0, **params: float) -> torch.Tensor:
        """The same divergence at each response token, (N,) nats, in row-major
        order of ``batch.label_mask`` (e.g. per-token weights or advantages)."""

    def loss(self, trainable: torch.Tensor | ResponseLogits, batch: TrainBatch,
             terms: dict[str, LossTerm]) -> dict[str, torch.Tensor]:
        """Several averaged terms on one trainable side in one pass over its logits (e.g. KD's
        ``(1 - r) * CE + r * KL``): ``loss`` is the sum of each :class:`~distillkit.api.LossTerm`'s weight
        times its mean, with gradients to the trainable side; each term's mean, detached, is under its
        name (for the log)."""

    def schedule(self, name: str, **params: float) -> float:
        """Registered schedule ``name`` at the step being taken, k = step + 1 of K.
        A schedule with state (declared in ``Method.schedules``) gives its
        value from the state its ``update`` reached after step k - 1; the
        run keeps that state, one per name (see :class:`~distillkit.api.Schedule`)."""

    def sample(self, model: torch.nn.Module, prompts: list[list[int]], *, prefix_embeds: torch.Tensor | None = None,
               key: tuple[Any, ...] | None = None, guide_model: torch.nn.Module | None = None,
               rule: SamplerRule | None = None, capped_ending: CappedEnding = "open") -> list[list[int]]:
        """One response (token ids, through the first EOS) per prompt, with the
        recipe's ``[generation]`` settings; randomness keyed by ``key``
        (default: seed and step) and the prompt.  With ``guide_model`` (no
        prefix) and ``rule`` (:class:`SamplerRule`), the rule chooses each token
        from both models' distributions (e.g. MiniLLM's teacher mix-in, SKD's
        top-K replacement)."""

    def global_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the processes (every process must call it
        the same number of times, e.g. once per micro-batch)."""

    def tokenize_responses(self, examples: ExampleBatch, texts: list[str]) -> list[list[int]]:
        """``texts`` tokenized as the responses of ``examples``' prompts, as the
        data pipeline tokenizes dataset responses (joint with the prompt, EOS
        appended, cut to ``data.max_length``)."""
