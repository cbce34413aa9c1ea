"""The top-k teacher-signal store (distillkit.engine.topk_cache): round trips
across shards and reopening, idempotent adds, the manifest check, crash
safety, row-slice reads and the stored dtypes and sizes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from distillkit.engine import topk_cache
from distillkit.engine.topk_cache import TopKCache
from distillkit.errors import DistillkitError

K, VOCAB = 4, 1000


def signal_row(n: int, seed: int, *, k: int = K, vocab_size: int = VOCAB) -> tuple[torch.Tensor, ...]:
    """A random top-k signal of n positions: distinct token ids, normalised log-probs and tail."""
    generator = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(vocab_size, generator=generator)[:k] for _ in range(n)]) if n else (
        torch.zeros(0, k, dtype=torch.long))
    logits = torch.randn(n, k + 1, generator=generator) * 3
    logprobs = logits.log_softmax(-1)
    return indices, logprobs[:, :k].contiguous(), logprobs[:, k].contiguous()


def assert_row_equal(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> None:
    indices, logprobs, tail = got
    assert indices.dtype == torch.int64 and logprobs.dtype == torch.float32 and tail.dtype == torch.float32
    assert torch.equal(indices, want[0])
    torch.testing.assert_close(logprobs, want[1].half().float(), rtol=0, atol=0)  # exactly fp16 rounding
    torch.testing.assert_close(logprobs, want[1], rtol=1e-3, atol=1e-3)
    assert torch.equal(tail, want[2])


def test_round_trip_across_two_shards_and_reopening(tmp_path: Path):
    lengths = {"a": 5, "b": 0, "c": 17, "d": 1, "e": 0, "f": 9}
    rows = {key: signal_row(n, seed) for seed, (key, n) in enumerate(lengths.items())}
    cache = TopKCache(tmp_path, k=K, vocab_size=VOCAB)
    cache.add({key: rows[key] for key in "abc"})
    cache.add({key: rows[key] for key in "def"})
    assert sorted(path.name for path in tmp_path.glob("shard-*")) == ["shard-00000.safetensors",
                                                                      "shard-00001.safetensors"]
    for opened in (cache, TopKCache(tmp_path, k=K, vocab_size=VOCAB)):
        assert len(opened) == 6 and all(key in opened for key in lengths)
        for key, n in lengths.items():
            got = opened.get(key)
            assert got[0].shape == (n, K) and got[2].shape == (n,)
            assert_row_equal(got, rows[key])
    with pytest.raises(KeyError, match="'zz'"):
        cache.get("zz")


def test_missing_and_adding_stored_keys_writes_nothing(tmp_path: Path):
    cache = TopKCache(tmp_path, k=K, vocab_size=VOCAB)
    assert cache.missing(["x", "y", "x", "z"]) == ["x", "y", "z"]
    cache.add({"y": signal_row(3, 1)})
    assert cache.missing(["x", "y", "x", "z"]) == ["x", "z"]
    before = {path.name: path.stat().st_mtime_ns for path in tmp_path.iterdir()}
    cache.add({"y": signal_row(3, 2)})  # already stored: kept as first written, no new shard or manifest
    assert {path.name: path.stat().st_mtime_ns for path in tmp_path.iterdir()} == before
    assert_row_equal(cache.get("y"), signal_row(3, 1))
    cache.add({"y": signal_row(3, 2), "z": signal_row(2, 3)})  # only z is new
    assert len(cache) == 2 and cache.missing(["x", "y", "z"]) == ["x"]
    assert_row_equal(cache.get("y"), signal_row(3, 1))


@pytest.mark.parametrize("k, vocab_size, mismatch", [(K + 1, VOCAB, "k=4"), (K, VOCAB + 1, "vocab_size=1000")])
def test_a_manifest_of_another_k_or_vocab_size_is_refused(tmp_path: Path, k: int, vocab_size: int, mismatch: str):
    TopKCache(tmp_path, k=K, vocab_size=VOCAB).add({"a": signal_row(2, 0)})
    with pytest.raises(DistillkitError, match=mismatch) as raised:
        TopKCache(tmp_path, k=k, vocab_size=vocab_size)
    assert str(tmp_path) in str(raised.value) and "\n" not in str(raised.value)


def test_a_writer_killed_before_the_manifest_leaves_the_earlier_rows(tmp_path: Path, monkeypatch):
    cache = TopKCache(tmp_path, k=K, vocab_size=VOCAB)
    cache.add({"a": signal_row(4, 0)})

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("writer killed")

    with monkeypatch.context() as patch:
        patch.setattr(topk_cache, "write_json_atomic", killed)
        with pytest.raises(KeyboardInterrupt):
            cache.add({"b": signal_row(6, 1)})
    assert (tmp_path / "shard-00001.safetensors").exists()  # the orphan shard
    assert "b" not in cache and len(cache) == 1
    reopened = TopKCache(tmp_path, k=K, vocab_size=VOCAB)
    assert len(reopened) == 1 and reopened.missing(["a", "b"]) == ["b"]
    reopened.add({"c": signal_row(2, 2), "b": signal_row(3, 3)})  # overwrites the orphan
    final = TopKCache(tmp_path, k=K, vocab_size=VOCAB)
    assert len(final) == 3
    for key, row in (("a", signal_row(4, 0)), ("b", signal_row(3, 3)), ("c", signal_row(2, 2))):
        assert_row_equal(final.get(key), row)
    assert final.size_bytes() == sum(path.stat().st_size for path in tmp_path.glob("shard-*.safetensors"))


def test_get_reads_only_the_rows_slice_from_one_lazily_opened_handle_per_shard(tmp_path: Path, monkeypatch):
    rows = {f"r{i}": signal_row(3 + i, i) for i in range(4)}
    writer = TopKCache(tmp_path, k=K, vocab_size=VOCAB)
    writer.add({key: rows[key] for key in ("r0", "r1")})
    writer.add({key: rows[key] for key in ("r2", "r3")})
    opened, sliced = [], []
    real_safe_open = topk_cache.safe_open

    class SliceOnly:
        """A safe_open handle that records get_slice and refuses everything else (get_tensor reads whole)."""

        def __init__(self, path: str, framework: str) -> None:
            opened.append(Path(path).name)
            self.handle = real_safe_open(path, framework=framework)

        def get_slice(self, name: str):
            sliced.append(name)
            return self.handle.get_slice(name)

        def __getattr__(self, name: str):
            raise AssertionError(f"get used {name}, not get_slice")

    monkeypatch.setattr(topk_cache, "safe_open", SliceOnly)
    reader = TopKCache(tmp_path, k=K, vocab_size=VOCAB)
    assert opened == []  # lazily
    for key in ("r0", "r1", "r0", "r3", "r2"):
        assert_row_equal(reader.get(key), rows[key])
    assert opened == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert sliced == ["indices", "logprobs", "tail"] * 5


@pytest.mark.parametrize("vocab_size, dtype", [(256, torch.uint8), (257, torch.uint16), (65536, torch.uint16),
                                               (65537, torch.int32), (151936, torch.int32)])
def test_index_dtype_and_bytes_per_position_match_the_file(tmp_path: Path, vocab_size: int, dtype: torch.dtype):
    from safetensors import safe_open

    cache = TopKCache(tmp_path, k=8, vocab_size=vocab_size)
    assert cache.index_dtype == dtype and cache.bytes_per_position == 8 * (dtype.itemsize + 2) + 4
    top = torch.full((1, 8), vocab_size - 1)  # the largest id survives storage
    rows = {"edge": (top, torch.zeros(1, 8), torch.zeros(1))}
    rows.update({f"r{i}": signal_row(100, i, k=8, vocab_size=vocab_size) for i in range(10)})
    cache.add(rows)
    with safe_open(str(tmp_path / "shard-00000.safetensors"), framework="pt") as handle:
        assert handle.get_slice("indices").get_dtype() == {torch.uint8: "U8", torch.uint16: "U16",
                                                           torch.int32: "I32"}[dtype]
        assert handle.get_slice("logprobs").get_dtype() == "F16" and handle.get_slice("tail").get_dtype() == "F32"
    header = cache.size_bytes() - 1001 * cache.bytes_per_position
    assert 0 < header < 1024
    assert torch.equal(cache.get("edge")[0], top)


def test_logprobs_are_clamped_to_the_fp16_range_and_minus_inf_kept(tmp_path: Path):
    cache = TopKCache(tmp_path, k=3, vocab_size=10)
    logprobs = torch.tensor([[-0.5, -1e6, -math.inf]])
    cache.add({"a": (torch.tensor([[1, 2, 3]]), logprobs, torch.tensor([-1e-30]))})
    _, stored, tail = TopKCache(tmp_path, k=3, vocab_size=10).get("a")
    assert stored.tolist() == [[-0.5, -65504.0, -math.inf]]
    assert tail.item() == torch.tensor(-1e-30).item()  # fp32, not flushed to zero as in fp16


@pytest.mark.parametrize("row, problem", [
    ((torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4), torch.zeros(3)), "must be"),
    ((torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 3), torch.zeros(2)), "must be"),
    ((torch.zeros(2, dtype=torch.long), torch.zeros(2), torch.zeros(2)), "must be"),
    ((torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), torch.zeros(2)), "k=3"),
    ((torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2)), "integers"),
    ((torch.full((2, 4), VOCAB), torch.zeros(2, 4), torch.zeros(2)), r"\[0, 1000\)"),
    ((torch.full((2, 4), -1), torch.zeros(2, 4), torch.zeros(2)), r"\[0, 1000\)"),
])
def test_bad_rows_are_refused_naming_the_row_and_nothing_is_written(tmp_path: Path, row, problem: str):
    cache = TopKCache(tmp_path, k=K, vocab_size=VOCAB)
    with pytest.raises(ValueError, match=problem) as raised:
        cache.add({"good": signal_row(2, 0), "bad-row": row})
    assert "'bad-row'" in str(raised.value)
    assert list(tmp_path.iterdir()) == [] and len(cache) == 0
