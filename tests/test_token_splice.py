"""utils/text_encoders.py's splice on a plain embedding table: negative ids take the extra vectors, every other id the vocabulary."""

from __future__ import annotations

import torch
from torch import nn

import pytest

from utils.text_encoders import SplicedTokenEmbedding, spliced


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


def test_the_wrapper_reports_the_tables_weight():
    base = _table()
    assert SplicedTokenEmbedding(base, torch.ones(1, 3)).weight is base.weight


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


def test_spliced_wraps_for_one_call_and_gives_the_table_back():
    base = _table()
    enc = Encoder(base)
    with spliced(enc, None):  # no vectors: nothing installed
        assert enc.get_input_embeddings() is base
    with spliced(enc, torch.ones(1, 3)):
        wrapper = enc.get_input_embeddings()
        assert isinstance(wrapper, SplicedTokenEmbedding) and wrapper.base is base
    assert enc.get_input_embeddings() is base
    with pytest.raises(RuntimeError), spliced(enc, torch.ones(1, 3)):
        raise RuntimeError("a failing forward")
    assert enc.get_input_embeddings() is base  # given back on errors too
