"""utils/data/balanced.py: K embeddings' streams side by side, each exactly its own run's stream, resumable."""

from __future__ import annotations

import torch

from utils.data.balanced import BalancedBatches
from utils.diffusion_loss import sample_seed


class FakeSource:
    """A BatchSource whose micro-batch j of epoch e holds samples tagged (tag, e, j, i), b per micro-batch."""

    def __init__(self, tag: int, per_epoch: int, b: int = 2):
        self.tag, self.micro_batches_per_epoch, self.b = tag, per_epoch, b
        self.opened = 0

    def iter_epoch(self, epoch, skip):
        self.opened += 1
        for j in range(skip, self.micro_batches_per_epoch):
            ids = [(self.tag, epoch, j, i) for i in range(self.b)]
            yield {"latents": torch.tensor([[float(self.tag), epoch, j, i] for i in range(self.b)]),
                   "prompts": [str(x) for x in ids], "positions": [j * self.b + i for i in range(self.b)],
                   "skipped": []}


def _collect(source, epochs):
    out = []
    for e in range(epochs):
        out += list(source.iter_epoch(e, 0))
    return out


def test_each_embedding_reads_its_own_stream_with_its_own_epochs_and_seeds():
    sources = [FakeSource(0, 3), FakeSource(1, 5), FakeSource(2, 2, b=1)]
    combined = BalancedBatches(sources, seed=7)
    assert combined.micro_batches_per_epoch == 5
    batches = _collect(combined, 3)  # 15 micro-batches
    assert len(batches) == 15
    for k, src in enumerate(sources):
        own = [p for e in range(20) for p in FakeSource(k, src.micro_batches_per_epoch, src.b).iter_epoch(e, 0)][:15]
        for m, (batch, mine) in enumerate(zip(batches, own)):
            rows = batch["embedding_index"] == k
            assert torch.equal(batch["latents"][rows], mine["latents"])
            got_prompts = [p for p, r in zip(batch["prompts"], rows.tolist()) if r]
            assert got_prompts == mine["prompts"]
            epoch = m // src.micro_batches_per_epoch
            seeds = [s for s, r in zip(batch["noise_seeds"], rows.tolist()) if r]
            assert seeds == [sample_seed(7, epoch, p) for p in mine["positions"]]
    # the pipelines are kept open across the combined epochs: each source opened once per its own epoch
    assert sources[1].opened == 3 and sources[0].opened == 5


def test_resume_anywhere_gives_the_same_batches():
    make = lambda: BalancedBatches([FakeSource(0, 3), FakeSource(1, 4)], seed=1)  # noqa: E731
    full = _collect(make(), 3)
    for epoch in range(3):
        for skip in range(4):
            resumed = list(make().iter_epoch(epoch, skip))
            expected = full[epoch * 4 + skip:(epoch + 1) * 4]
            assert len(resumed) == len(expected)
            for a, b in zip(resumed, expected):
                assert torch.equal(a["latents"], b["latents"]) and a["noise_seeds"] == b["noise_seeds"]


def test_an_embedding_that_left_has_no_samples_and_the_others_do_not_move():
    left: dict[int, int] = {}
    full = _collect(BalancedBatches([FakeSource(0, 3), FakeSource(1, 4), FakeSource(2, 2)], seed=1), 2)
    combined = BalancedBatches([FakeSource(0, 3), FakeSource(1, 4), FakeSource(2, 2)], seed=1, left=left)
    got = []
    for m, batch in enumerate(combined.iter_epoch(0, 0)):
        got.append(batch)
        if m == 1:
            left[1] = 2  # the early stop fires after micro-batch 1: from micro-batch 2 on, embedding 1 is not read
    got += list(combined.iter_epoch(1, 0))
    assert len(got) == len(full) == 8
    for m, (a, b) in enumerate(zip(got, full)):
        if m < 2:
            assert torch.equal(a["latents"], b["latents"]) and a["noise_seeds"] == b["noise_seeds"]
            continue
        assert 1 not in a["embedding_index"].tolist()
        keep = b["embedding_index"] != 1
        assert torch.equal(a["latents"], b["latents"][keep])
        assert torch.equal(a["embedding_index"], b["embedding_index"][keep])
        assert a["noise_seeds"] == [s for s, k in zip(b["noise_seeds"], keep.tolist()) if k]
        assert a["prompts"] == [p for p, k in zip(b["prompts"], keep.tolist()) if k]
    # a resumed run that knows who left reads the same micro-batches
    resumed = list(BalancedBatches([FakeSource(0, 3), FakeSource(1, 4), FakeSource(2, 2)], seed=1,
                                   left={1: 2}).iter_epoch(1, 1))
    assert [r["prompts"] for r in resumed] == [g["prompts"] for g in got[5:]]
    # all left: no micro-batch at all
    assert list(BalancedBatches([FakeSource(0, 3)], seed=1, left={0: 1}).iter_epoch(0, 0)) == []


def test_no_sources_is_an_error():
    import pytest

    with pytest.raises(ValueError, match="^no sources$"):
        BalancedBatches([], seed=0)
