"""watch(model) stays right when the model changes (issue 14): parameters after model.to(dtype)
are still recognized and never compressed (class 5), and a watched submodule that raises leaves
no module label behind to name later sites (class 9)."""

from __future__ import annotations

import pytest
import torch
from probe import rel, save, with_history

import laser_triton as lt


class Net(torch.nn.Module):
    def __init__(self, fail: bool = False):
        super().__init__()
        self.up = torch.nn.Linear(160, 160)
        self.inner = torch.nn.Sequential(torch.nn.Linear(160, 160), torch.nn.GELU())
        self.fail = fail

    def forward(self, x):
        h = self.up(x)
        h = self.inner(h)
        if self.fail:
            raise ValueError("boom")
        return h


def test_exception_in_watched_submodule_leaves_no_labels():
    cfg = lt.LaserConfig(tau=0.05, rank=8, max_rank=32)
    x = torch.randn(300, 160)

    def sites_of_one_call(laser, net):
        with laser.compress():
            net(x).square().sum().backward()
        return sorted(laser.trackers)

    fresh, net = lt.Laser(cfg), Net()
    fresh.watch(net)
    reference = sites_of_one_call(fresh, net)
    laser = lt.Laser(cfg)
    laser.watch(net)
    inner_fail = Net()
    inner_fail.inner[1].register_forward_hook(lambda *a: (_ for _ in ()).throw(KeyError("x")))
    laser.watch(inner_fail)
    for bad in (lambda: Net(fail=True), lambda: inner_fail):
        model = bad()
        laser.watch(model)
        with pytest.raises((ValueError, KeyError)):
            with laser.compress():
                model(x)
        with pytest.raises((ValueError, KeyError)):
            model(x)  # outside compress() too
    laser.trackers.clear()
    assert sites_of_one_call(laser, net) == reference  # no phantom labels in the names
    assert laser._labels.stack() == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_parameters_after_model_to_dtype_are_never_compressed(dtype):
    g = torch.Generator().manual_seed(0)

    def low_rank(*shape):  # compressible, so LASER would compress it if it took it
        return (torch.randn(300, 4, generator=g) @ torch.randn(4, 256, generator=g)).view(shape)

    model = torch.nn.Module()
    model.train_w = torch.nn.Parameter(low_rank(2, 150, 256))  # 3-D: not weight-shaped
    model.frozen = torch.nn.Parameter(low_rank(2, 150, 256), requires_grad=False)
    model.register_buffer("table", low_rank(300, 256))
    laser = lt.Laser(lt.LaserConfig(tau=0.05, rank=8, max_rank=32))
    laser.watch(model)
    model.to(dtype)  # new storages for every parameter and buffer
    act = low_rank(300, 256)
    record = []
    with laser.compress():
        out = save(record, model.frozen, model.frozen[1], model.train_w.detach(),
                   model.table, with_history(act.to(dtype)))
    out.backward()
    frozen, frozen1, train_w, table, got_act = record[0]
    assert torch.equal(frozen, model.frozen) and frozen.dtype == dtype
    assert torch.equal(frozen1, model.frozen[1])
    assert torch.equal(train_w, model.train_w.detach())
    assert torch.equal(table, model.table)
    assert 0 < rel(got_act, act.to(dtype)) <= 0.05  # the activation itself is compressed
