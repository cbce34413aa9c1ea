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
the single-process run does.  It is also what lets the sampler batch
continuously: a row leaves the batch when it ends and the next prompt takes
its place, joining the running KV cache left-padded, so the batch stays
full instead of waiting for its longest row.  The KV cache grows in place
(buffers with room, doubled when full) rather than being copied at every
step, for models whose cache is full attention throughout.

A *rule* (:class:`~distillkit.api.SamplerRule`) intervenes at each token with
a ``guide_model`` (e.g. the teacher): it sees both models' processed scores
and chooses the tokens; both models are then fed the chosen tokens, so their
KV caches hold the final sequence.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
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


NOISE = "row-keyed gumbel 2"
"""The version of the row-keyed draws, in the keys of cached samples (eval cells, teacher
generations): 2 since the top 24-bit value stopped giving infinite noise."""

_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX = (_signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB))


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 ``x`` (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64_(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser, in place on int64 ``x`` (multiplications wrap mod 2^64)."""
    shifted = torch.empty_like(x)
    for bits, multiplier in ((30, _MIX[0]), (27, _MIX[1]), (31, None)):
        torch.bitwise_right_shift(x, bits, out=shifted)
        x ^= shifted.bitwise_and_((1 << (64 - bits)) - 1)
        if multiplier is not None:
            x *= multiplier
    return x


def _row_hashes(row_keys: torch.Tensor, token_index: int | torch.Tensor) -> torch.Tensor:
    """(B,) int64: each row's hash of its key and the token index (one, or one per row (B,))."""
    index = torch.as_tensor(token_index, dtype=torch.int64, device=row_keys.device)
    return _splitmix64_(row_keys + (index + 1) * _GOLDEN)  # int64 products wrap mod 2^64


def gumbel_noise(row_keys: torch.Tensor, token_index: int | torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, V) float32 standard Gumbel noise, a pure function of each row's
    int64 key (B,), the token index (one, or one per row (B,)) and the
    vocabulary index."""
    columns = torch.arange(vocab_size, device=row_keys.device, dtype=torch.int64) * _GOLDEN
    return standard_gumbel(_shift_right(_splitmix64_(_row_hashes(row_keys, token_index)[:, None] + columns), 40))


def standard_gumbel(bits: torch.Tensor) -> torch.Tensor:
    """Float32 Gumbel noise of 24-bit integers ``bits`` through u = (bits + 0.5) / 2^24 in (0, 1).
    The top value's u rounds to 1.0 in float32 (noise +inf: that token drawn whatever its
    score), so u stops at the largest float32 below 1."""
    uniform = bits.float().add_(0.5).div_(float(1 << 24)).clamp_(max=1.0 - 2.0**-24)
    return uniform.log_().neg_().log_().neg_()


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


class _GrowingLayer(DynamicLayer):
    """A full-attention cache layer whose keys and values (B, heads, S, d) are
    the filled part of buffers with room for more positions (doubled when
    full): a decode step writes one position where :class:`DynamicLayer`
    copies the whole cache (``torch.cat``)."""

    buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor) -> _GrowingLayer:
        layer = cls()
        layer.update(keys, values)
        return layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        if self.buffers is None or end > self.buffers[0].shape[-2] or self.keys.data_ptr() != self.buffers[0].data_ptr():
            shape = (*key_states.shape[:2], 2 * end, key_states.shape[-1])
            self.buffers = (key_states.new_empty(shape), value_states.new_empty(shape))
            if length:
                self.buffers[0][..., :length, :], self.buffers[1][..., :length, :] = self.keys, self.values
        self.buffers[0][..., length:end, :], self.buffers[1][..., length:end, :] = key_states, value_states
        self.keys, self.values = self.buffers[0][..., :end, :], self.buffers[1][..., :end, :]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.buffers is not None:
            length = self.get_seq_length()
            self.buffers = (self.buffers[0][indices], self.buffers[1][indices])
            self.keys, self.values = self.buffers[0][..., :length, :], self.buffers[1][..., :length, :]


def _grows_in_place(model: torch.nn.Module) -> bool:
    """Whether ``model``'s own cache would be full-attention :class:`DynamicLayer`
    throughout, so that a cache of :class:`_GrowingLayer` can stand in (not,
    e.g., with sliding windows: the model then builds its own)."""
    config = getattr(model, "config", None)
    return config is not None and all(type(layer) is DynamicLayer for layer in DynamicCache(config=config).layers)


def _left_padded_cat(tensors: list[torch.Tensor], dim: int, value: int = 0) -> torch.Tensor:
    """``tensors`` concatenated along dim 0, each first left-padded with ``value``
    along ``dim`` (counted from the end, -1 or -2) to the widest."""
    width = max(t.shape[dim] for t in tensors)
    return torch.cat([F.pad(t, (0, 0) * (-dim - 1) + (width - t.shape[dim], 0), value=value) for t in tensors])


@dataclass
class _Stream:
    """One model's decoding state over the rows in flight: its KV cache, the
    attention mask (L, S) over the cached positions, and the next-token
    logits (L, V)."""

    model: torch.nn.Module
    cache: Any
    mask: torch.Tensor
    logits: torch.Tensor
    grows: bool  # a cache of _GrowingLayer: rows can join it (left-padded) and it can lose leading columns

    @classmethod
    def prefill(cls, model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor,
                prefix_embeds: torch.Tensor | None, grows: bool) -> _Stream:
        """Run left-padded prompts (L, P) through ``model``; with ``prefix_embeds``
        (m, d) in m attended slots in front (positions 0..m-1, as in training);
        ``grows``: on a cache of :class:`_GrowingLayer` (see :func:`_grows_in_place`)."""
        context = contextlib.nullcontext()
        if prefix_embeds is not None:
            input_ids, mask = with_prefix_slots(input_ids, mask, prefix_embeds.shape[0])
            context = prefix_embeddings(model, prefix_embeds)
        with context:  # the prefill needs the last position's logits only
            out = model(input_ids=input_ids, attention_mask=mask, position_ids=_positions(mask),
                        cache=Cache(layer_class_to_replicate=_GrowingLayer) if grows else None, use_cache=True,
                        logits_to_keep=1)
        return cls(model, out.cache, mask, out.logits[:, -1], grows)

    def extend(self, tokens: torch.Tensor, live: torch.Tensor) -> None:
        """Feed one token per row (L,).  Rows no longer ``live`` (L,) get a
        masked position that does not advance, so a finished row never runs
        past its model's positions while others go on."""
        self.mask = torch.cat([self.mask, live[:, None].to(self.mask.dtype)], dim=-1)
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask,
                         position_ids=_positions(self.mask)[:, -1:], cache=self.cache, use_cache=True)
        self.cache, self.logits = out.cache, out.logits[:, -1]

    def select(self, rows: torch.Tensor) -> None:
        """Keep ``rows`` (indices); drop the leading positions none of them attends."""
        self.cache.batch_select_indices(rows)
        self.mask, self.logits = self.mask[rows], self.logits[rows]
        lead = int(self.mask.any(0).to(torch.int8).argmax())
        if lead >= max(16, self.mask.shape[1] // 8) and self.grows:  # worth a copy of the cache
            self.cache = Cache(layers=[_GrowingLayer.holding(layer.keys[..., lead:, :], layer.values[..., lead:, :])
                                       for layer in self.cache.layers])
            self.mask = self.mask[:, lead:]

    def join(self, other: _Stream) -> None:
        """Append ``other``'s rows, the shorter side left-padded with unattended positions."""
        self.cache = Cache(layers=[
            _GrowingLayer.holding(_left_padded_cat([mine.keys, new.keys], -2),
                                  _left_padded_cat([mine.values, new.values], -2))
            for mine, new in zip(self.cache.layers, other.cache.layers)])
        self.mask = _left_padded_cat([self.mask, other.mask], -1)
        self.logits = torch.cat([self.logits, other.logits])


@dataclass
class _Rows:
    """The rows in flight: prompt indices (L,), token history (L, W) for the
    processors (left-filled with pad), its real length, tokens drawn, length
    budget, finished flags and noise keys per row, and one stream per model."""

    index: torch.Tensor
    history: torch.Tensor
    length: torch.Tensor
    drawn: torch.Tensor
    budget: torch.Tensor
    finished: torch.Tensor
    keys: torch.Tensor | None
    streams: list[_Stream]
    fed: bool = True  # whether the streams' logits follow the last drawn token

    def select(self, rows: torch.Tensor) -> None:
        for name in ("index", "history", "length", "drawn", "budget", "finished"):
            setattr(self, name, getattr(self, name)[rows])
        self.keys = None if self.keys is None else self.keys[rows]
        for stream in self.streams:
            stream.select(rows)
        self.history = self.history[:, self.history.shape[1] - int(self.length.max()):]

    def join(self, other: _Rows, pad_token_id: int) -> None:
        self.history = _left_padded_cat([self.history, other.history], -1, pad_token_id)
        for name in ("index", "length", "drawn", "budget", "finished"):
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))
        self.keys = None if self.keys is None else torch.cat([self.keys, other.keys])
        for stream, new in zip(self.streams, other.streams):
            stream.join(new)


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
    batch_size: int = 0,
    progress: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Sample one response per prompt with ``settings`` (temperature, top-k,
    top-p, n-gram ban, ``max_new_tokens``).

    Returns the response token ids of each prompt, through the first EOS
    (kept) or cut at ``max_new_tokens``; with ``max_length`` > 0 also at
    ``max_length - len(prompt)``, per row (``max_new_tokens = 0``: that
    alone), so a row's length limit does not depend on its batch-mates.  ``vocab_size`` (the tokenizer's
    size) masks padded rows of the output matrix.  ``prefix_embeds`` (m, d),
    e.g. a soft prompt, is prepended to every prompt as input embeddings
    (positions 0..m-1, as in training).  With ``guide_model`` and ``rule``,
    each token is ``rule(scores, guide_scores, draw)`` (L,) from both models'
    next-token scores (L, V), each after the same processors, where
    ``draw(scores, stream=0)`` draws from any scores with this token's noise
    (stream s > 0: independent noise); without, it is ``draw(scores)``.
    ``row_keys`` (one int64 per prompt) replace ``generator`` with per-row
    noise (see the module docstring).

    ``batch_size`` (0: all) caps the rows decoded at once.  With row keys or
    greedy decoding a row's tokens do not depend on its batch-mates, so the
    sampler drops each row when it ends and, once a quarter of the batch is
    free, admits the next prompts (in the given order) into the running
    batch, their caches left-padded to the batch's; with one ``generator``
    the prompts run in consecutive batches of ``batch_size``, every row kept
    to the end (its draws consume the generator as the batch's do).
    ``progress(n)`` is told each time n more rows have ended.

    ``keep_going(unfinished)`` combines this process's "some row is
    unfinished" over the processes that share a sharded model (FSDP /
    ZeRO-3), which must all run the same number of forward passes (so all
    prompts in one batch); the default, ``bool``, stops when this process is
    done.  ``capped_ending`` is what a response cut at its length limit ends
    with: ``"open"`` leaves it as sampled, ``"eos"`` replaces its last token
    by EOS (PromptKD's ``response_ids[:, -1] = pad_token_id`` with pad = EOS,
    gmkim-ai/PromptKD ``train_promptkd.py`` ``finetune``), so that every
    sample teaches the model to stop.
    """
    if (guide_model is None) != (rule is None):
        raise ValueError("sample() takes guide_model and rule together")
    capacity = batch_size if 0 < batch_size < len(prompts) else len(prompts)
    if capacity < len(prompts) and keep_going is not bool:
        raise ValueError("processes that share a sharded model sample all their prompts in one batch (batch_size 0)")
    if not prompts:
        return []
    models = [m for m in (model, guide_model) if m is not None]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    device = next(model.parameters()).device
    processors = logits_processors(settings)
    grows = [_grows_in_place(m) for m in models]
    independent = row_keys is not None or settings.temperature == 0  # no row's draw depends on another's
    pending = list(range(len(prompts)))[::-1]  # popped from the end: the given order
    tokens: list[list[int]] = [[] for _ in prompts]
    rows: _Rows | None = None

    def admit(chosen: list[int]) -> _Rows:
        """Prefill the prompts ``chosen`` (indices) as new rows."""
        group = [prompts[i] for i in chosen]
        input_ids, prompt_mask = (t.to(device) for t in left_pad(group, pad_token_id))
        length = torch.tensor([len(p) for p in group], device=device)
        fill = 2**62 if max_length > 0 else 0  # max_new_tokens = 0: up to max_length
        budget = torch.full_like(length, settings.max_new_tokens if settings.max_new_tokens > 0 else fill)
        if max_length > 0:
            budget = torch.minimum(budget, (max_length - length).clamp(min=0))
        keys = None if row_keys is None else torch.tensor([row_keys[i] for i in chosen], dtype=torch.int64,
                                                           device=device)
        streams = [_Stream.prefill(model, input_ids, prompt_mask, prefix_embeds, grows[0])]
        if guide_model is not None:
            streams.append(_Stream.prefill(guide_model, input_ids, prompt_mask, None, grows[1]))
        if progress is not None and bool((budget == 0).any()):
            progress(int((budget == 0).sum()))  # no room left: they end empty
        return _Rows(torch.tensor(chosen, device=device), input_ids, length, torch.zeros_like(length), budget,
                     budget == 0, keys, streams)

    def draw(scores: torch.Tensor, stream: int = 0) -> torch.Tensor:
        """Tokens (L,) drawn from ``scores`` (L, V) with each row's next noise of ``stream``."""
        if settings.temperature == 0:
            return scores.argmax(-1)
        if rows.keys is not None:
            keys = rows.keys if stream == 0 else _splitmix64_(rows.keys + _signed(stream * 0xD1B54A32D192ED03))
            return (scores + gumbel_noise(keys, rows.drawn, scores.shape[-1])).argmax(-1)
        return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)

    def unfinished() -> bool:
        return bool(pending) or (rows is not None and not bool(rows.finished.all()))

    while keep_going(unfinished()):
        if rows is not None and not rows.fed:  # feed the last token (no forward pass whose logits nobody reads)
            for stream in rows.streams:
                stream.extend(rows.history[:, -1], ~rows.finished)
            rows.fed = True
        room = capacity - (0 if rows is None else len(rows.index))
        joinable = rows is not None and independent and all(grows)
        if pending and (rows is None or (joinable and room >= max(1, capacity // 4))):
            new = admit([pending.pop() for _ in range(min(room, len(pending)))])
            if rows is None:
                rows = new
            else:
                rows.join(new, pad_token_id)
        scores = [processors(rows.history, s.logits[:, :vocab_size].float()) for s in rows.streams]
        chosen = draw(scores[0]) if rule is None else rule(scores[0], scores[1], draw)
        live = ~rows.finished
        chosen = torch.where(live, chosen, torch.full_like(chosen, pad_token_id))
        rows.history = torch.cat([rows.history, chosen[:, None]], dim=-1)
        rows.length, rows.drawn, rows.fed = rows.length + live, rows.drawn + live, False
        for i, token in zip(rows.index[live].tolist(), chosen[live].tolist()):
            tokens[i].append(token)
        ended = live & ((chosen == eos_token_id) | (rows.drawn >= rows.budget))
        rows.finished |= ended
        if progress is not None and bool(ended.any()):
            progress(int(ended.sum()))
        if pending and bool(rows.finished.all()):
            rows = None  # the next prompts start afresh
        elif independent and bool(rows.finished.any()) and not bool(rows.finished.all()):
            rows.select((~rows.finished).nonzero().squeeze(-1))  # the last rows stay for keep_going's extra passes
    for m, mode in zip(models, modes):
        m.train(mode)
    return [ended_with_eos(t, eos_token_id) if capped_ending == "eos" else t for t in tokens]
