"""A teacher with another tokenizer than the student's, as a sparse signal over the student's vocabulary.

:func:`teacher_view` decodes the student batch ``[x ‖ y]`` and re-tokenizes it for the teacher; at each student label
position whose next token starts at a response byte where a teacher token starts too (after the same bytes),
:func:`student_signal` keeps the teacher's k most likely tokens among those with a byte-identical student token
(:class:`VocabularyMap`), under their student ids, plus one tail bucket with all the rest of the teacher's mass: a
:class:`~distillkit.api.TopKSignal` with ``valid``, so every divergence works unchanged on its k + 1 outcomes
(:func:`~distillkit.engine.losses.masked_token_divergences`); one tokenizer on both sides at k = V is the dense case.

Why: exact-match vocabulary projection plus one tail bucket at shared token boundaries compares both models on the
same events, like the matched-token part of TRL's GOLD; ULD's distance between sorted probability vectors (arXiv
2402.12030), the alternative not taken, needs no map but discards token identity.  Not done: positions where the
tokenizations share no boundary are left out; GOLD merges such spans by multiplying the pieces' probabilities, which
is not a distribution over the same event as the student's next token.

Token bytes are exact for byte-level BPE (GPT-2 byte-to-unicode table), else found by decoding.  Special tokens are
zero-width: a response's final EOS starts at its end on both sides and aligns with the other side's EOS.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.convert_slow_tokenizer import bytes_to_unicode

from distillkit.api.batch import TopKSignal, TrainBatch, collate
from distillkit.engine.losses import MAX_CHUNK_ROWS, log_rest

SPECIAL_ROLES = ("eos_token_id", "pad_token_id", "bos_token_id")
"""Special tokens mapped by role, teacher to student, in this order of precedence."""


def is_byte_level(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` is a fast tokenizer whose decoder is (or contains) the byte-level one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.decoder is None:
        return False
    state = json.loads(backend.decoder.__getstate__())
    return "ByteLevel" in {state["type"], *(part["type"] for part in state.get("decoders", []))}


@functools.lru_cache(maxsize=8)
def vocabulary_bytes(tokenizer: Any) -> dict[int, bytes]:
    """The UTF-8 bytes of each non-special token id of ``tokenizer`` (cached per tokenizer object: one changed
    after its first call keeps its old entry).

    Byte-level BPE: the token string through the GPT-2 byte-to-unicode table (added tokens: their text).  Others:
    the text the token adds after itself, ``convert_tokens_to_string([token, token])`` past that of ``[token]``
    (a lone SentencePiece ``▁the`` decodes to ``the``), leaving out tokens whose text contains U+FFFD.
    """
    byte_of_char = {char: byte for byte, char in bytes_to_unicode().items()}
    special, added = set(tokenizer.all_special_ids), tokenizer.added_tokens_decoder
    byte_level = is_byte_level(tokenizer)
    pieces = {}
    for token, token_id in tokenizer.get_vocab().items():
        if token_id in special:
            continue
        if token_id in added:
            pieces[token_id] = added[token_id].content.encode()
        elif not byte_level:
            once, twice = (tokenizer.convert_tokens_to_string([token] * times) for times in (1, 2))
            if twice.startswith(once) and "\ufffd" not in twice:
                pieces[token_id] = twice[len(once):].encode()
        elif all(char in byte_of_char for char in token):
            pieces[token_id] = bytes(byte_of_char[char] for char in token)
    return pieces


def token_bytes(tokenizer: Any, ids: Sequence[int]) -> list[bytes]:
    """The bytes each token of ``ids`` contributes to the text they decode to; b"" for special tokens.  Not
    byte-level: by decoding each prefix (quadratic in len(ids); a partial character may shift bytes to a neighbour)."""
    if is_byte_level(tokenizer):
        pieces = vocabulary_bytes(tokenizer)
        return [pieces.get(token_id, b"") for token_id in ids]

    def decoded(prefix: Sequence[int]) -> bytes:
        return tokenizer.decode(list(prefix), skip_special_tokens=True, clean_up_tokenization_spaces=False).encode()

    text, start, out = decoded(ids), 0, []
    for end in range(1, len(ids) + 1):
        stop = max(start, min(len(text), len(decoded(ids[:end]))))
        out.append(text[start:stop])
        start = stop
    return out


def token_byte_spans(tokenizer: Any, ids: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) of each token of ``ids`` in the UTF-8 bytes of their text; special tokens are zero-width."""
    return spans_of(token_bytes(tokenizer, ids))


def spans_of(pieces: Sequence[bytes]) -> list[tuple[int, int]]:
    """[start, end) of each of ``pieces`` in their concatenation."""
    ends = list(itertools.accumulate(map(len, pieces)))
    return list(zip([0, *ends[:-1]], ends))


@dataclass(frozen=True)
class VocabularyMap:
    """``student_of`` (V_t,) int64: for each teacher token id the student id of the token with the same bytes, -1
    where none; special tokens map by role (EOS to EOS, pad and BOS likewise), others are unmatched.  Injective:
    a student id already taken (e.g. one id for EOS, pad and BOS) is not given to a second teacher id."""

    student_of: torch.Tensor

    @property
    def matched(self) -> int:
        """How many teacher tokens have a student id."""
        return int((self.student_of >= 0).sum())

    @classmethod
    def between(cls, teacher_tokenizer: Any, student_tokenizer: Any) -> VocabularyMap:
        student_id_of = {}
        for student_id, piece in sorted(vocabulary_bytes(student_tokenizer).items()):
            student_id_of.setdefault(piece, student_id)
        pairs = [(getattr(teacher_tokenizer, role), getattr(student_tokenizer, role)) for role in SPECIAL_ROLES]
        pairs += [(teacher_id, student_id_of.get(piece))
                  for teacher_id, piece in sorted(vocabulary_bytes(teacher_tokenizer).items())]
        student_of, taken = [-1] * len(teacher_tokenizer), set()
        for teacher_id, student_id in pairs:
            if None not in (teacher_id, student_id) and student_id not in taken and student_of[teacher_id] < 0:
                student_of[teacher_id] = student_id
                taken.add(student_id)
        return cls(torch.tensor(student_of, dtype=torch.long))


def aligned_tokens(student_pieces: Sequence[bytes], teacher_pieces: Sequence[bytes]) -> list[tuple[int, int]]:
    """(j, m) pairs of response token indices, from each token's bytes (:func:`token_bytes`): student token j and
    teacher token m start at the same byte of the response, after the same bytes, and are both zero-width
    (special) or both not."""
    shared = len(os.path.commonprefix([b"".join(student_pieces), b"".join(teacher_pieces)]))
    teacher_token_at: dict[tuple[int, bool], int] = {}
    for m, (start, end) in enumerate(spans_of(teacher_pieces)):
        teacher_token_at.setdefault((start, start == end), m)
    return [(j, teacher_token_at[start, start == end]) for j, (start, end) in enumerate(spans_of(student_pieces))
            if start <= shared and (start, start == end) in teacher_token_at]


def teacher_view(batch: TrainBatch, student_tokenizer: Any, teacher_tokenizer: Any) -> tuple[TrainBatch, torch.Tensor]:
    """The student batch re-tokenized for the teacher (B, T_t), and ``alignment`` (B, T_s - 1) int64: for each
    student label position the teacher label position whose next token starts at the same response byte
    (:func:`aligned_tokens`), -1 where none or off the response.  Both on the batch's device.

    Per row the prompt and response ids decode to two texts, which the teacher tokenizes as
    :func:`distillkit.data.tokenization.tokenize` does (no special tokens added; its response: the tokens of prompt
    + response past the prompt's), plus its EOS where the student's response ends with EOS; padded with the
    teacher's pad id (else EOS)."""
    rows, width = batch.input_ids.shape
    alignment = torch.full((rows, width - 1), -1, dtype=torch.long)
    teacher_prompts, teacher_responses = [], []
    for row in range(rows):
        response_positions = batch.response_mask[row].nonzero().squeeze(-1)
        start = int(response_positions[0]) if len(response_positions) else int(batch.attention_mask[row].sum())
        response_ids = batch.input_ids[row, response_positions].tolist()
        student_pieces = token_bytes(student_tokenizer, batch.input_ids[row, :start].tolist() + response_ids)
        prompt_text, response_text = (b"".join(part).decode("utf-8", errors="replace")
                                      for part in (student_pieces[:start], student_pieces[start:]))
        teacher_prompt = teacher_tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        teacher_response = teacher_tokenizer(prompt_text + response_text, add_special_tokens=False)["input_ids"]
        teacher_response = teacher_response[len(teacher_prompt):]
        if response_ids and response_ids[-1] == student_tokenizer.eos_token_id:
            teacher_response.append(teacher_tokenizer.eos_token_id)
        teacher_prompts.append(teacher_prompt)
        teacher_responses.append(teacher_response)
        teacher_pieces = token_bytes(teacher_tokenizer, teacher_prompt + teacher_response)[len(teacher_prompt):]
        for j, m in aligned_tokens(student_pieces[start:], teacher_pieces):
            if start + j >= 1 and len(teacher_prompt) + m >= 1:
                alignment[row, start + j - 1] = len(teacher_prompt) + m - 1
    pad_id = teacher_tokenizer.pad_token_id
    view = collate(teacher_prompts, teacher_responses, teacher_tokenizer.eos_token_id if pad_id is None else pad_id)
    device = batch.input_ids.device
    return view.to(device), alignment.to(device)


def aligned_fraction(alignment: torch.Tensor, label_mask: torch.Tensor) -> float:
    """The fraction of student response label positions (``label_mask`` (B, T_s - 1)) with a teacher position."""
    return float((alignment >= 0).sum()) / max(1, int(label_mask.sum()))


@torch.no_grad()
def student_signal(teacher_logits: torch.Tensor, alignment: torch.Tensor, vocabulary_map: VocabularyMap, k: int,
                   *, chunk_size: int = MAX_CHUNK_ROWS) -> TopKSignal:
    """The teacher's distributions as a :class:`TopKSignal` over the student's vocabulary, (B, T_s - 1, k').

    ``teacher_logits`` (B, T_t - 1, V_t), any float dtype (columns past the teacher's tokens are padding);
    ``alignment`` from :func:`teacher_view`.  At each aligned position the k' = min(k, matched) most likely teacher
    tokens with a student id: ``indices`` those ids (int64), ``logprobs`` their teacher log-probabilities (fp32,
    temperature 1), ``tail`` (B, T_s - 1) the log of all other teacher mass (logsumexp over the rest of the row).
    Zero where ``valid`` (``alignment >= 0``) is false; ``chunk_size`` positions at a time."""
    vocab = teacher_logits.shape[-1]
    if vocab < len(vocabulary_map.student_of):
        raise ValueError(f"teacher logits have {vocab} columns, the teacher {len(vocabulary_map.student_of)} tokens")
    padding = torch.full((vocab - len(vocabulary_map.student_of),), -1, dtype=torch.long)
    student_of = torch.cat([vocabulary_map.student_of, padding]).to(teacher_logits.device)
    matched = (student_of >= 0).nonzero().squeeze(-1)
    width = min(k, len(matched))
    valid = alignment >= 0
    indices = torch.zeros(*alignment.shape, width, dtype=torch.long, device=teacher_logits.device)
    logprobs = torch.zeros(*alignment.shape, width, device=teacher_logits.device)
    tail = torch.zeros(alignment.shape, device=teacher_logits.device)
    rows, positions = valid.nonzero(as_tuple=True)
    for chunk in torch.arange(len(rows), device=rows.device).split(chunk_size):
        row, position = rows[chunk], positions[chunk]
        logp = torch.log_softmax(teacher_logits[row, alignment[row, position]].float(), dim=-1)
        values, picked = logp[:, matched].topk(width, dim=-1)
        teacher_ids = matched[picked]
        indices[row, position] = student_of[teacher_ids]
        logprobs[row, position] = values
        tail[row, position] = log_rest(logp, teacher_ids).squeeze(-1)
    return TopKSignal(indices, logprobs, tail, valid)
