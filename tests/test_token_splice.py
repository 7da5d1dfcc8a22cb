"""utils/token_splice.py on a plain embedding table: negative ids take the extra vectors, every other id the vocabulary."""

from __future__ import annotations

import torch
from torch import nn

from utils.token_splice import SplicedTokenEmbedding, find_subsequence, splice_into, unsplice


class Encoder(nn.Module):
    """The two methods of a transformers text model that the splice uses."""

    def __init__(self, table: nn.Embedding):
        super().__init__()
        self.table = table

    def get_input_embeddings(self):
        return self.table

    def set_input_embeddings(self, module):
        self.table = module


def _table() -> nn.Embedding:
    torch.manual_seed(0)
    return nn.Embedding(6, 3)


def test_negative_ids_take_the_vectors_and_id_0_stays_vocabulary():
    base = _table()
    vectors = torch.arange(6.0).reshape(2, 3) + 100
    ids = torch.tensor([[4, -1, -2, 0, 5, 0]])  # 0: OpenCLIP's padding id, a real vocabulary row
    out = SplicedTokenEmbedding(base, vectors)(ids)
    assert torch.equal(out[0, 1], vectors[0]) and torch.equal(out[0, 2], vectors[1])
    for k in (0, 3, 4, 5):
        assert torch.equal(out[0, k], base.weight[ids[0, k]])


def test_without_vectors_it_is_the_plain_table_and_reports_its_shape():
    base = _table()
    wrapper = SplicedTokenEmbedding(base, None)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(wrapper(ids), base(ids))
    assert wrapper.weight is base.weight and (wrapper.num_embeddings, wrapper.embedding_dim) == (6, 3)


def test_vectors_follow_the_output_dtype_and_get_the_gradient():
    base = _table().to(torch.bfloat16)
    vectors = nn.Parameter(torch.ones(1, 3))
    out = SplicedTokenEmbedding(base, vectors)(torch.tensor([[-1, 2]]))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert torch.equal(vectors.grad, torch.ones(1, 3))


def test_vectors_are_moved_to_the_models_device():
    # "meta" stands in for a GPU: the vectors live on the CPU, the text encoder elsewhere
    base = nn.Embedding(6, 3, device="meta")
    out = SplicedTokenEmbedding(base, torch.ones(2, 3))(torch.tensor([[1, -1]], device="meta"))
    assert out.device.type == "meta" and out.shape == (1, 2, 3)


def test_splice_into_wraps_once_and_unsplice_restores_the_table():
    table = _table()
    enc = Encoder(table)
    first = splice_into(enc, torch.zeros(1, 3))
    assert enc.get_input_embeddings() is first and first.base is table and torch.equal(first.vectors, torch.zeros(1, 3))
    second = splice_into(enc, torch.ones(2, 3))
    assert second is first and torch.equal(first.vectors, torch.ones(2, 3))  # re-pointed, not wrapped twice
    unsplice(enc)
    assert enc.get_input_embeddings() is table
    unsplice(enc)  # a second call changes nothing
    assert enc.get_input_embeddings() is table


def test_find_subsequence():
    seq = [5, 1, 2, 1, 2, 3]
    assert find_subsequence(seq, [1, 2]) == 1
    assert find_subsequence(seq, [1, 2], start=2) == 3
    assert find_subsequence(seq, [2, 3]) == 4  # at the very end
    assert find_subsequence(seq, [5]) == 0
    assert find_subsequence(seq, [3, 4]) == -1 and find_subsequence(seq, [1, 2], start=4) == -1
    assert find_subsequence([1], [1, 2]) == -1
