"""Token packing: every token once per epoch, in order, split documents going on in the next sequence, exact resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainio.loaders import (
    DatasetWriter,
    PackedLoader,
    PackTokens,
    ResumeMismatch,
    StreamingDataset,
    pack_documents,
)

documents = st.lists(st.integers(0, 40), min_size=0, max_size=30).map(
    lambda lengths: [np.arange(1000 * i, 1000 * i + n, dtype=np.int64) for i, n in enumerate(lengths)])


def expected_tokens(docs: list[np.ndarray], eos: int | None) -> np.ndarray:
    parts = [np.append(d, eos) if eos is not None else d for d in docs]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


@settings(max_examples=300, deadline=None)
@given(docs=documents, seq_len=st.integers(1, 17), batch=st.integers(1, 4), eos=st.sampled_from([None, -1]),
       cut=st.integers(0, 50))
def test_every_token_once_in_order_and_a_resume_goes_on_exactly(docs: list[np.ndarray], seq_len: int, batch: int,
                                                                 eos: int | None, cut: int) -> None:
    pack = PackTokens("tokens", seq_len, eos=eos, pad=-7)
    packed = list(pack_documents(docs, pack, batch))
    tokens = np.concatenate([b["tokens"][b["mask"]] for b, _, _ in packed]) if packed else np.zeros(0)
    assert np.array_equal(tokens, expected_tokens(docs, eos))
    for b, _, _ in packed:
        assert b["tokens"].shape == (batch, seq_len) and (b["tokens"][~b["mask"]] == -7).all()
        cu = b["cu_seqlens"]
        assert cu[0] == 0 and cu[-1] == batch * seq_len and (np.diff(cu) > 0).all()
        assert b["max_seqlen"] == int(np.diff(cu).max()) <= seq_len
        starts = set(cu[:-1].tolist())
        assert all(s in starts for s in range(0, batch * seq_len, seq_len))  # no segment crosses a sequence
        flat_positions, flat_tokens = b["position_ids"].reshape(-1), b["tokens"].reshape(-1)
        real = b["mask"].reshape(-1)
        for begin, end in zip(cu[:-1].tolist(), cu[1:].tolist()):  # a segment is one document's run, or padding
            assert real[begin:end].all() or not real[begin:end].any()
            if real[begin]:
                assert np.array_equal(flat_positions[begin:end], flat_positions[begin] + np.arange(end - begin))
        doc_tokens = flat_tokens[real & (flat_tokens >= 0)]
        assert np.array_equal(flat_positions[real & (flat_tokens >= 0)], doc_tokens % 1000)
    if packed:
        k = cut % len(packed)
        _, finished, offset = packed[k]
        rest = list(pack_documents(docs[finished:], pack, batch, offset))
        assert len(rest) == len(packed) - k - 1
        for (a, _, _), (b, _, _) in zip(rest, packed[k + 1:]):
            assert all(np.array_equal(a[key], b[key]) for key in a)


def test_an_offset_outside_its_document_is_refused() -> None:
    with pytest.raises(ValueError, match="offset of 5 tokens is not inside its document of 3"):
        list(pack_documents([np.arange(3)], PackTokens("t", 4), 1, offset=5))


ROWS = 500


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("packing") / "ds"
    rng = np.random.default_rng(0)
    with DatasetWriter(path, shard_bytes=20_000, batch_rows=40) as writer:
        for i in range(ROWS):
            writer.write({"id": i, "tokens": np.arange(int(rng.integers(1, 60)), dtype=np.int32) + 100 * i})
    return path


def run(local: Path, rank: int, steps: int | None = None, state: dict[str, Any] | None = None
        ) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any], PackedLoader]:
    dataset = StreamingDataset(local, seed=2, rank=rank, world_size=2)
    loader = PackedLoader(dataset, 4, PackTokens("tokens", 64, eos=-1))
    if state is not None:
        loader.load_state_dict(state)
    out = []
    for batch in loader:
        out.append(batch)
        if steps is not None and len(out) == steps:
            break
    return out, loader.state_dict(), loader


def test_each_rank_packs_its_own_documents_and_together_they_hold_every_token(local: Path) -> None:
    everything = []
    for rank in (0, 1):
        batches, _, _ = run(local, rank)
        assert all(b["tokens"].shape == (4, 64) for b in batches)
        everything += [t for b in batches for t in b["tokens"][b["mask"]].tolist() if t >= 0]
    assert sorted(everything) == sorted(t for d in StreamingDataset(local, seed=2) for t in d["tokens"].tolist())


def test_a_packed_position_resumes_mid_document_without_rereading_what_was_consumed(local: Path) -> None:
    whole, _, _ = run(local, 1)
    first, state, _ = run(local, 1, steps=5)
    assert state["offset"] > 0 or state["documents"] > 0
    rest, _, loader = run(local, 1, state=state)
    assert len(first) + len(rest) == len(whole)
    for a, b in zip(first + rest, whole):
        assert all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)
    assert loader.state_dict()["dataset"]["epoch"] == 1  # the pass read to its end: the next epoch


def test_a_packed_state_from_elsewhere_is_refused(local: Path) -> None:
    _, state, _ = run(local, 0, steps=2)
    other = PackedLoader(StreamingDataset(local, seed=2, rank=1, world_size=2), 4, PackTokens("tokens", 64, eos=-1))
    with pytest.raises(ResumeMismatch, match="'rank' is 0"):
        other.load_state_dict(state)
    same = PackedLoader(StreamingDataset(local, seed=2, rank=0, world_size=2), 4, PackTokens("tokens", 32, eos=-1))
    with pytest.raises(ResumeMismatch, match="'pack'"):
        same.load_state_dict(state)
    with pytest.raises(ResumeMismatch, match="'documents'"):
        PackedLoader(StreamingDataset(local, seed=2, rank=0, world_size=2), 4,
                     PackTokens("tokens", 64, eos=-1)).load_state_dict({**state, "documents": 10**6})
    with pytest.raises(ValueError, match="must name a list field"):
        PackedLoader(StreamingDataset(local), 4, PackTokens("id", 64))
