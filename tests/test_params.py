import pytest
import torch
from torch import nn

from dldr.params import FlatParams, shard_slices


@pytest.mark.parametrize("num_shards", [1, 2, 3, 7])
def test_shard_copies_concatenate_to_w(num_shards):
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    flat = FlatParams(list(model.parameters()))
    w = flat.get()
    shards = [flat.get(rows) for rows in shard_slices(flat.numel, num_shards)]
    assert [len(s) for s in shards] == [s.stop - s.start for s in shard_slices(flat.numel, num_shards)]
    assert torch.equal(torch.cat(shards), w)
    shards[0][0] += 1.0  # a copy, not a view: the background writer may hold it while training goes on
    assert torch.equal(flat.get(), w)
