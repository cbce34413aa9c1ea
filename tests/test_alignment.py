"""The cross-tokenizer teacher signal (distillkit.engine.alignment) between real byte-level BPE tokenizers trained on
different Dolly rows: the 300-token ``tokenizer`` fixture (validation rows) and a 700-token one (training rows),
both ways round, and one tokenizer on both sides (the identity, where the path is the dense teacher at k = V)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from distillkit.api import TrainBatch, collate
from distillkit.config import DataConfig
from distillkit.data.loading import load_split
from distillkit.data.templates import format_prompt
from distillkit.data.tokenization import tokenize
from distillkit.engine.alignment import (
    VocabularyMap,
    aligned_fraction,
    aligned_tokens,
    student_signal,
    teacher_view,
    token_byte_spans,
    token_bytes,
)
from distillkit.engine.losses import masked_token_divergences
from distillkit.engine.models import train_bpe_tokenizer
from distillkit.registry import registry
from tests.conftest import tiny_model

PROMPT = "### Instruction:\nHow do we work?\n\n### Response:\n"


@pytest.fixture(scope="session")
def wide_tokenizer():
    """A 700-token byte-level BPE tokenizer trained on the first 300 Dolly training rows (``tokenizer``: 300
    tokens, validation rows)."""
    examples = load_split(DataConfig(dataset="dolly"), "train")[:300]
    return train_bpe_tokenizer((format_prompt(e) + e.references[0] for e in examples), 700)


@pytest.fixture(scope="session")
def dolly_rows():
    """50 Dolly training rows that neither tokenizer was trained on."""
    return load_split(DataConfig(dataset="dolly"), "train")[1000:1050]


def dolly_batch(tokenizer, rows) -> TrainBatch:
    """The rows as the data pipeline tokenizes them (prompts cut to their last 256 tokens, 512 in all)."""
    examples, _ = tokenize(rows, tokenizer, max_prompt_length=256, max_length=512, long_prompts="cut_left")
    return collate([e.prompt_ids for e in examples], [e.response_ids for e in examples], tokenizer.pad_token_id)


def hand_batch(tokenizer, response: str) -> TrainBatch:
    """One row, :data:`PROMPT` + ``response`` + EOS, tokenized as the data pipeline does."""
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    joint = tokenizer(PROMPT + response, add_special_tokens=False)["input_ids"]
    return collate([prompt], [joint[len(prompt):] + [tokenizer.eos_token_id]], tokenizer.pad_token_id)


def response_spans(tokenizer, batch: TrainBatch, row: int) -> tuple[int, list[tuple[int, int]]]:
    """Where the row's response starts (token index) and its tokens' byte spans in the response."""
    start = int(batch.response_mask[row].int().argmax())
    return start, token_byte_spans(tokenizer, batch.input_ids[row, batch.response_mask[row]].tolist())


def spans_and_pieces(tokenizer, text: str) -> tuple[list[tuple[int, int]], list[bytes]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return token_byte_spans(tokenizer, ids), [text.encode()[a:b] for a, b in token_byte_spans(tokenizer, ids)]


# --- byte spans ---------------------------------------------------------------------------------------------------


def test_multibyte_characters_split_into_byte_tokens_get_byte_spans(tokenizer):
    text = "é 日本語 😀"  # 2 + 1 + 9 + 1 + 4 bytes; these 300 tokens have none of them whole
    spans, pieces = spans_and_pieces(tokenizer, text)
    assert spans == [(i, i + 1) for i in range(17)]
    assert pieces == [bytes([byte]) for byte in text.encode()]
    assert pieces[:2] == [b"\xc3", b"\xa9"]  # é: two tokens, neither valid UTF-8 alone


def test_runs_of_whitespace_and_newlines(tokenizer):
    spans, pieces = spans_and_pieces(tokenizer, "a  b\n\n\tc   \n d")
    assert pieces == [b"a", b" ", b" b", b"\n", b"\n", b"\t", b"c", b" ", b" ", b" ", b"\n", b" d"]
    assert spans == [(0, 1), (1, 2), (2, 4), (4, 5), (5, 6), (6, 7), (7, 8), (8, 9), (9, 10), (10, 11), (11, 12),
                     (12, 14)]


def test_a_word_in_different_pieces(tokenizer, wide_tokenizer):
    assert spans_and_pieces(tokenizer, " together") == (
        [(0, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 9)], [b" t", b"o", b"g", b"e", b"t", b"h", b"er"])
    assert spans_and_pieces(wide_tokenizer, " together") == (
        [(0, 3), (3, 4), (4, 6), (6, 9)], [b" to", b"g", b"et", b"her"])
    assert spans_and_pieces(wide_tokenizer, "Café")[1] == [b"C", b"a", b"f", b"\xc3", b"\xa9"]


def test_special_tokens_are_zero_width(tokenizer):
    ids = tokenizer("hi", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    assert token_byte_spans(tokenizer, [eos, *ids, eos]) == [(0, 0), (0, 1), (1, 2), (2, 2)]
    assert token_bytes(tokenizer, [eos]) == [b""]


# --- the vocabulary map -------------------------------------------------------------------------------------------


def test_vocabulary_map_matches_tokens_by_bytes(tokenizer, wide_tokenizer):
    mapping = VocabularyMap.between(wide_tokenizer, tokenizer)
    teacher, student = wide_tokenizer.get_vocab(), tokenizer.get_vocab()
    assert mapping.student_of.shape == (len(wide_tokenizer),) and mapping.student_of.dtype == torch.int64
    for token in ["Ġthe", "a", "Ċ", "Ġb", "Ã", "er"]:  # in both (the same ids or not)
        assert mapping.student_of[teacher[token]] == student[token], token
    assert teacher["Ġt"] != student["Ġt"]  # a hand-checked pair with different ids
    for token in ["Ġto", "ĠResponse", "her", "###"]:  # teacher-only tokens
        assert token not in student and mapping.student_of[teacher[token]] == -1, token
    assert mapping.student_of[wide_tokenizer.eos_token_id] == tokenizer.eos_token_id
    assert "ti" not in teacher and student["ti"] not in mapping.student_of  # a student-only token is no target
    assert mapping.matched == len(student) - 1  # every student token but "ti"
    assert (mapping.student_of >= 0).sum() == len(set(mapping.student_of[mapping.student_of >= 0].tolist()))


def test_special_tokens_map_by_role_and_never_share_a_student_id(tokenizer, wide_tokenizer):
    teacher = copy.deepcopy(wide_tokenizer)
    teacher.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<sep>"]})
    mapping = VocabularyMap.between(teacher, tokenizer)
    assert mapping.student_of[teacher.eos_token_id] == tokenizer.eos_token_id
    # the student's one special token serves as EOS, pad and BOS: the teacher's own pad gets no second claim on it
    assert mapping.student_of[teacher.pad_token_id] == -1
    assert mapping.student_of[teacher.convert_tokens_to_ids("<sep>")] == -1


def test_identity_vocabulary_map(tokenizer):
    mapping = VocabularyMap.between(tokenizer, tokenizer)
    assert torch.equal(mapping.student_of, torch.arange(len(tokenizer))) and mapping.matched == len(tokenizer)


# --- the teacher view ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("student_is_wide", [False, True], ids=["student 300, teacher 700", "student 700, teacher 300"])
def test_teacher_view_of_dolly_rows(tokenizer, wide_tokenizer, dolly_rows, student_is_wide):
    student, teacher = (wide_tokenizer, tokenizer) if student_is_wide else (tokenizer, wide_tokenizer)
    batch = dolly_batch(student, dolly_rows)
    view, alignment = teacher_view(batch, student, teacher)
    assert alignment.shape == batch.labels.shape and alignment.dtype == torch.int64
    assert not (alignment >= 0)[~batch.label_mask].any()
    assert 0.5 < aligned_fraction(alignment, batch.label_mask) < 1.0
    for row in range(len(dolly_rows)):
        assert (student.decode(batch.input_ids[row, batch.attention_mask[row].bool()])
                == teacher.decode(view.input_ids[row, view.attention_mask[row].bool()]))
        student_start, student_spans = response_spans(student, batch, row)
        teacher_start, teacher_spans = response_spans(teacher, view, row)
        teacher_starts = {start: m for m, (start, end) in enumerate(teacher_spans) if end > start}
        for position in batch.label_mask[row].nonzero().squeeze(-1).tolist():
            start, end = student_spans[position + 1 - student_start]
            if end == start:  # EOS, aligned to the teacher's EOS
                assert batch.labels[row, position] == student.eos_token_id
                assert view.labels[row, alignment[row, position]] == teacher.eos_token_id
            elif start in teacher_starts:
                assert alignment[row, position] == teacher_start + teacher_starts[start] - 1
            else:
                assert alignment[row, position] == -1
        assert view.label_mask[row, alignment[row][alignment[row] >= 0]].all()


def test_unaligned_positions_where_no_teacher_token_starts(tokenizer, wide_tokenizer):
    """The response " together": the student's " t|o|g|e|t|h|er" against the teacher's " to|g|et|her"."""
    batch = hand_batch(tokenizer, " together")
    view, alignment = teacher_view(batch, tokenizer, wide_tokenizer)
    student_start, teacher_start = (int(b.response_mask[0].int().argmax()) for b in (batch, view))
    student_pieces = token_bytes(tokenizer, batch.input_ids[0, student_start:].tolist())
    teacher_pieces = token_bytes(wide_tokenizer, view.input_ids[0, teacher_start:].tolist())
    assert student_pieces == [b" t", b"o", b"g", b"e", b"t", b"h", b"er", b""]
    assert teacher_pieces == [b" to", b"g", b"et", b"her", b""]
    pairs = [(0, 0), (2, 1), (3, 2), (5, 3), (7, 4)]  # o, t and er start inside teacher tokens
    assert aligned_tokens(student_pieces, teacher_pieces) == pairs
    expected = torch.full_like(alignment, -1)
    for j, m in pairs:
        expected[0, student_start + j - 1] = teacher_start + m - 1
    assert torch.equal(alignment, expected)
    assert aligned_fraction(alignment, batch.label_mask) == 5 / 8


def test_only_bytes_after_the_same_response_bytes_align():
    assert aligned_tokens([b"ab", b"c"], [b"a", b"bc"]) == [(0, 0)]
    assert aligned_tokens([b"x", b"y", b"z"], [b"x", b"q", b"z"]) == [(0, 0), (1, 1)]  # z follows other bytes


# --- the signal ---------------------------------------------------------------------------------------------------


def logits_of(model, batch: TrainBatch) -> torch.Tensor:
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]


def test_identity_is_the_dense_teacher_at_k_equal_v(tokenizer, dolly_rows):
    batch = dolly_batch(tokenizer, dolly_rows[:12])
    view, alignment = teacher_view(batch, tokenizer, tokenizer)
    assert torch.equal(view.input_ids, batch.input_ids) and torch.equal(view.response_mask, batch.response_mask)
    positions = torch.arange(alignment.shape[1]).expand_as(alignment)
    assert torch.equal(alignment, torch.where(batch.label_mask, positions, -1))
    assert aligned_fraction(alignment, batch.label_mask) == 1.0
    mapping = VocabularyMap.between(tokenizer, tokenizer)
    forward_kl = registry().divergences["forward_kl"]
    with torch.no_grad():
        student_logits = logits_of(tiny_model(tokenizer, seed=1, n_positions=512), batch)
        teacher_logits = logits_of(tiny_model(tokenizer, n_layer=2, n_embd=48, seed=2, n_positions=512), view)
    itself = student_signal(student_logits, alignment, mapping, len(tokenizer))
    assert itself.k == len(tokenizer) and torch.isinf(itself.tail[batch.label_mask]).all()
    to_itself = masked_token_divergences(forward_kl, student_logits, itself, batch.label_mask)
    assert to_itself.abs().max() < 1e-6
    signal = student_signal(teacher_logits, alignment, mapping, len(tokenizer))
    dense = masked_token_divergences(forward_kl, student_logits, teacher_logits, batch.label_mask)
    sparse = masked_token_divergences(forward_kl, student_logits, signal, batch.label_mask)
    assert dense.min() > 0.01
    torch.testing.assert_close(sparse, dense, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 20, 10_000])
def test_signal_between_different_tokenizers(tokenizer, wide_tokenizer, dolly_rows, k):
    batch = dolly_batch(tokenizer, dolly_rows[:8])
    view, alignment = teacher_view(batch, tokenizer, wide_tokenizer)
    mapping = VocabularyMap.between(wide_tokenizer, tokenizer)
    teacher = tiny_model(wide_tokenizer, seed=3, n_positions=512, vocab_size=len(wide_tokenizer) + 12)
    with torch.no_grad():
        teacher_logits = logits_of(teacher, view)  # 12 padded columns past the teacher's vocabulary
    signal = student_signal(teacher_logits, alignment, mapping, k, chunk_size=100)
    width = min(k, mapping.matched)
    assert signal.indices.shape == (*batch.labels.shape, width) and signal.tail.shape == batch.labels.shape
    assert signal.indices.dtype == torch.int64 and signal.logprobs.dtype == signal.tail.dtype == torch.float32
    assert torch.equal(signal.valid, alignment >= 0) and signal.valid.any() and not signal.valid.all()
    valid = signal.valid
    outcomes = torch.cat([signal.logprobs, signal.tail[..., None]], -1)[valid]
    torch.testing.assert_close(torch.logsumexp(outcomes.double(), -1), torch.zeros(len(outcomes), dtype=torch.double),
                               atol=1e-5, rtol=0)
    indices = signal.indices[valid]
    assert ((indices >= 0) & (indices < len(tokenizer))).all()
    assert all(len(set(row)) == width for row in indices.tolist())
    assert (signal.logprobs[valid].diff(dim=-1) <= 0).all()
    assert not signal.indices[~valid].any() and not signal.logprobs[~valid].any() and not signal.tail[~valid].any()
    # one position by hand, in float64: the top matched teacher tokens under their student ids, the rest in the tail
    row, position = valid.nonzero()[len(valid.nonzero()) // 2].tolist()
    logp = torch.log_softmax(teacher_logits[row, alignment[row, position]].double(), -1)
    student_of = torch.cat([mapping.student_of, torch.full((12,), -1)])
    top = logp.masked_fill(student_of < 0, -math.inf).topk(width).indices
    assert torch.equal(signal.indices[row, position], student_of[top])
    torch.testing.assert_close(signal.logprobs[row, position].double(), logp[top], atol=1e-5, rtol=0)
    rest = torch.ones_like(logp, dtype=torch.bool).index_fill(0, top, False)
    torch.testing.assert_close(signal.tail[row, position].double(), torch.logsumexp(logp[rest], 0), atol=1e-5,
                               rtol=0)


def test_signal_rejects_logits_narrower_than_the_teacher_vocabulary(tokenizer, wide_tokenizer):
    mapping = VocabularyMap.between(wide_tokenizer, tokenizer)
    with pytest.raises(ValueError, match="700 tokens"):
        student_signal(torch.zeros(1, 3, 300), torch.zeros(1, 3, dtype=torch.long), mapping, 5)


# --- a tokenizer that is not byte-level ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def metaspace_tokenizer():
    """A 500-token SentencePiece-style BPE (Metaspace: spaces as "▁", a lone token's leading space dropped on
    decoding) trained on the first 300 Dolly validation rows."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    examples = load_split(DataConfig(dataset="dolly"), "validation")[:300]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    backend.train_from_iterator((format_prompt(e) + e.references[0] for e in examples),
                                trainers.BpeTrainer(vocab_size=500, special_tokens=["</s>", "<unk>"], min_frequency=2))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")


def test_a_metaspace_teacher(tokenizer, metaspace_tokenizer, dolly_rows):
    teacher = metaspace_tokenizer
    ids = teacher("the cat  sat.\nThe end", add_special_tokens=False)["input_ids"]
    assert teacher.convert_ids_to_tokens(ids)[:4] == ["▁the", "▁c", "at", "▁"]
    assert token_bytes(teacher, ids) == [b"the", b" c", b"at", b" ", b" s", b"at", b".", b"\n", b"The", b" ", b"end"]
    mapping = VocabularyMap.between(teacher, tokenizer)  # by the bytes a token adds inside a text
    assert mapping.student_of[teacher.convert_tokens_to_ids("▁the")] == tokenizer.convert_tokens_to_ids("Ġthe")
    assert mapping.student_of[teacher.convert_tokens_to_ids("at")] == tokenizer.convert_tokens_to_ids("at")
    assert mapping.student_of[teacher.eos_token_id] == tokenizer.eos_token_id
    batch = dolly_batch(tokenizer, dolly_rows[:10])
    view, alignment = teacher_view(batch, tokenizer, teacher)
    assert 0.5 < aligned_fraction(alignment, batch.label_mask) < 1.0
    for row in range(10):  # each aligned pair starts at the same byte of the response, in the row's context
        student_starts, teacher_starts = (row_starts(tok, b, row) for tok, b in ((tokenizer, batch), (teacher, view)))
        for position in (alignment[row] >= 0).nonzero().squeeze(-1).tolist():
            assert student_starts[position + 1] == teacher_starts[alignment[row, position] + 1]


def row_starts(tokenizer, batch: TrainBatch, row: int) -> list[int]:
    """Where each token of the row starts, in bytes from the start of its response."""
    ids = batch.input_ids[row, batch.attention_mask[row].bool()].tolist()
    starts = [start for start, _ in token_byte_spans(tokenizer, ids)]
    return [start - starts[int(batch.response_mask[row].int().argmax())] for start in starts]
