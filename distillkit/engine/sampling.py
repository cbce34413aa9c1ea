"""The one sampler: batched ancestral sampling with a KV cache.

Prompts are left-padded with explicit ``position_ids`` (``cumsum(mask) - 1``),
so models without learned left-padding support (GPT-2) see the same
positions as unpadded prompts.  Sampling runs under ``no_grad`` in eval mode;
a ``torch.Generator`` makes it reproducible without touching the global RNG.

With ``row_keys``, each row draws its tokens by the Gumbel-max trick from
counter-based noise (a splitmix64 hash of the row's key, the token index and
the vocabulary index): a row's sample then depends only on its key, prompt
and model, never on its batch-mates, the batch size, the process it runs in
or the device, which is what makes a multi-process run sample exactly what
the single-process run does.

A *rule* (:class:`~distillkit.api.SamplerRule`) intervenes at each token with
a ``guide_model`` (e.g. the teacher): it sees both models' processed scores
and chooses the tokens; both models are then fed the chosen tokens, so their
KV caches hold the final sequence.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from distillkit.api.batch import CappedEnding, ended_with_eos, left_pad
from distillkit.config import GenerationConfig
from distillkit.engine.prefix import prefix_embeddings, with_prefix_slots

if TYPE_CHECKING:
    from distillkit.api.context import SamplerRule


def logits_processors(settings: GenerationConfig) -> LogitsProcessorList:
    """The ``transformers`` processors of ``settings``, applied in this order:
    the n-gram ban, temperature, top-k, top-p (none for the paper's settings;
    ``temperature = 0``, greedy, needs none)."""
    processors = LogitsProcessorList()
    if settings.no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGramLogitsProcessor(settings.no_repeat_ngram_size))
    if settings.temperature > 0 and settings.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(settings.temperature))
    if settings.top_k > 0:
        processors.append(TopKLogitsWarper(settings.top_k))
    if settings.top_p < 1.0:
        processors.append(TopPLogitsWarper(settings.top_p))
    return processors


def _signed(value: int) -> int:
    """A 64-bit constant as the int64 torch stores (two's complement)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX = (_signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB))


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 ``x`` (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser on int64 tensors (multiplications wrap mod 2^64)."""
    x = (x ^ _shift_right(x, 30)) * _MIX[0]
    x = (x ^ _shift_right(x, 27)) * _MIX[1]
    return x ^ _shift_right(x, 31)


def gumbel_noise(row_keys: torch.Tensor, token_index: int, vocab_size: int) -> torch.Tensor:
    """(B, V) float32 standard Gumbel noise, a pure function of each row's
    int64 key (B,), the token index and the vocabulary index."""
    rows = _splitmix64(row_keys + _signed((token_index + 1) * 0x9E3779B97F4A7C15))
    columns = torch.arange(vocab_size, device=row_keys.device, dtype=torch.int64) * _GOLDEN
    bits = _shift_right(_splitmix64(rows[:, None] + columns), 40)  # the top 24 bits
    uniform = (bits.float() + 0.5) / float(1 << 24)  # in (0, 1)
    return -torch.log(-torch.log(uniform))


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _prefill(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix_embeds: torch.Tensor | None
) -> tuple[Any, torch.Tensor]:
    """Run the left-padded prompts (B, P) through ``model`` with a KV cache;
    returns the output (last position's logits only) and the attention mask,
    extended by the prefix when ``prefix_embeds`` (m, d) is given."""
    context = contextlib.nullcontext()
    if prefix_embeds is not None:
        input_ids, attention_mask = with_prefix_slots(input_ids, attention_mask, prefix_embeds.shape[0])
        context = prefix_embeddings(model, prefix_embeds)
    with context:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=_positions(attention_mask),
                    use_cache=True, logits_to_keep=1)  # the prefill needs the last position's logits only
    return out, attention_mask


def _extend(
    model: torch.nn.Module, tokens: torch.Tensor, attention_mask: torch.Tensor, out: Any, live: torch.Tensor
) -> tuple[Any, torch.Tensor]:
    """Feed one new token per row (B,) through ``model`` on top of its cache.
    Rows that are no longer ``live`` (B,) (finished) get a masked position
    that does not advance, so a long-finished row never runs past its
    model's positions while others go on."""
    attention_mask = torch.cat([attention_mask, live[:, None].to(attention_mask.dtype)], dim=-1)
    out = model(input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=_positions(attention_mask)[:, -1:],
                cache=out.cache, use_cache=True)
    return out, attention_mask


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompts: list[list[int]],
    settings: GenerationConfig,
    *,
    eos_token_id: int,
    pad_token_id: int,
    vocab_size: int,
    generator: torch.Generator | None = None,
    row_keys: list[int] | None = None,
    prefix_embeds: torch.Tensor | None = None,
    guide_model: torch.nn.Module | None = None,
    rule: SamplerRule | None = None,
    keep_going: Callable[[bool], bool] = bool,
    max_length: int = 0,
    capped_ending: CappedEnding = "open",
) -> list[list[int]]:
    """Sample one response per prompt with ``settings`` (temperature, top-k,
    top-p, n-gram ban, ``max_new_tokens``; its ``batch_size`` is the caller's).

    Returns the response token ids of each prompt, through the first EOS
    (kept) or cut at ``max_new_tokens``; with ``max_length`` > 0 also at
    ``max_length - len(prompt)``, per row (``max_new_tokens = 0``: that
    alone), so a row's length limit does not depend on its batch-mates.  ``vocab_size`` (the tokenizer's
    size) masks padded rows of the output matrix.  ``prefix_embeds`` (m, d),
    e.g. a soft prompt, is prepended to every prompt as input embeddings
    (positions 0..m-1, as in training).  With ``guide_model`` and ``rule``,
    each token is ``rule(scores, guide_scores, draw)`` (B,) from both models'
    next-token scores (B, V), each after the same processors, where
    ``draw(scores, stream=0)`` draws from any scores with this token's noise
    (stream s > 0: independent noise); without, it is ``draw(scores)``.
    ``row_keys`` (one int64 per prompt) replace ``generator`` with per-row
    noise (see the module docstring).  ``keep_going(unfinished)`` combines
    this process's "some row is unfinished" over the processes that share a
    sharded model (FSDP / ZeRO-3), which must all run the same number of
    forward passes; the default, ``bool``, stops when this process is done.
    ``capped_ending`` is what a response cut at its length limit ends with:
    ``"open"`` leaves it as sampled, ``"eos"`` replaces its last token by
    EOS (PromptKD's ``response_ids[:, -1] = pad_token_id`` with pad = EOS,
    gmkim-ai/PromptKD ``train_promptkd.py`` ``finetune``), so that every
    sample teaches the model to stop.
    """
    if (guide_model is None) != (rule is None):
        raise ValueError("sample() takes guide_model and rule together")
    models = [m for m in (model, guide_model) if m is not None]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    device = next(model.parameters()).device
    input_ids, prompt_mask = (t.to(device) for t in left_pad(prompts, pad_token_id))
    processors = logits_processors(settings)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    fill = 2**62 if max_length > 0 else 0  # max_new_tokens = 0: up to max_length
    budget = torch.full_like(lengths, settings.max_new_tokens if settings.max_new_tokens > 0 else fill)
    if max_length > 0:
        budget = torch.minimum(budget, (max_length - lengths).clamp(min=0))
    finished = budget == 0
    keys = None if row_keys is None else torch.tensor(row_keys, dtype=torch.int64, device=device)
    generated = input_ids
    out, attention_mask = _prefill(model, input_ids, prompt_mask, prefix_embeds)
    if guide_model is not None:
        guide_out, guide_mask = _prefill(guide_model, input_ids, prompt_mask, None)
    step = 0

    def draw(scores: torch.Tensor, stream: int = 0) -> torch.Tensor:
        """Tokens (B,) drawn from ``scores`` (B, V) with token ``step``'s noise of ``stream``."""
        if settings.temperature == 0:
            return scores.argmax(-1)
        if keys is not None:
            stream_keys = keys if stream == 0 else _splitmix64(keys + _signed(stream * 0xD1B54A32D192ED03))
            return (scores + gumbel_noise(stream_keys, step, scores.shape[-1])).argmax(-1)
        return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)

    while keep_going(not bool(finished.all())):
        if step > 0:  # feed the previous token (no forward pass whose logits nobody reads)
            out, attention_mask = _extend(model, generated[:, -1], attention_mask, out, ~finished)
            if guide_model is not None:
                guide_out, guide_mask = _extend(guide_model, generated[:, -1], guide_mask, guide_out, ~finished)
        scores = processors(generated, out.logits[:, -1, :vocab_size].float())
        if rule is None:
            next_tokens = draw(scores)
        else:
            next_tokens = rule(scores, processors(generated, guide_out.logits[:, -1, :vocab_size].float()), draw)
        next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_token_id), next_tokens)
        generated = torch.cat([generated, next_tokens[:, None]], dim=-1)
        step += 1
        finished |= (next_tokens == eos_token_id) | (budget <= step)
    for m, mode in zip(models, modes):
        m.train(mode)
    responses = []
    for row, limit in zip(generated[:, input_ids.shape[1] :].tolist(), budget.tolist()):
        end = row.index(eos_token_id) + 1 if eos_token_id in row else len(row)
        response = row[: min(end, limit)]
        responses.append(ended_with_eos(response, eos_token_id) if capped_ending == "eos" else response)
    return responses
