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


def test_channels_last_model_has_the_same_w_as_its_contiguous_copy():
    """Phases build every model channels-last; w must still be each parameter in logical (NCHW) order."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    packed = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    packed.load_state_dict(dense.state_dict())
    packed = packed.to(memory_format=torch.channels_last)
    assert not packed[0].weight.is_contiguous()  # the layouts really differ
    flat_dense, flat_packed = FlatParams(list(dense.parameters())), FlatParams(list(packed.parameters()))
    assert torch.equal(flat_packed.get(), flat_dense.get())
    base, direction = torch.randn(flat_dense.numel), torch.randn(flat_dense.numel)
    x = torch.randn(2, 3, 5, 5)
    for flat in (flat_dense, flat_packed):
        flat.set_combination(base, direction, 0.5)
        flat.add_(direction, alpha=-0.25)
    assert torch.equal(flat_packed.get(), flat_dense.get())
    assert torch.allclose(packed(x.contiguous(memory_format=torch.channels_last)), dense(x), atol=1e-5)
    for model in (dense, packed):
        model(x).sum().backward()
    assert torch.allclose(flat_packed.grad(), flat_dense.grad(), atol=1e-5)
