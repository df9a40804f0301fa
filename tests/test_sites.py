"""Site names come from one definition (laser_triton.sites) shared by Laser and the tools that
must name the same sites: the saved-tensor counter and the activation recorder name a step's
saves exactly as Laser does, also after a watched submodule raised (its label must not leak
into later names)."""

from __future__ import annotations

import pytest
import torch

import laser_triton as lt
from laser_triton.tools.analysis.capture import ActivationRecorder
from laser_triton.trm.savecount import SavedTensorCounter


class Boom(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(160, 160)
        self.armed = False

    def forward(self, x):
        h = self.lin(x)
        if self.armed:
            raise ValueError("boom")
        return torch.nn.functional.gelu(h)


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(160, 160)
        self.boom = Boom()

    def forward(self, x):
        h = self.up(x)
        h = h * torch.sigmoid(h)  # saved outside any submodule: label ""
        return self.boom(h)


def _names(tool, net: Net, x: torch.Tensor, collected: list[str]) -> list[str]:
    collected.clear()
    with tool.compress():
        with tool.role("z"):
            net(x).square().sum().backward()
    if isinstance(tool, SavedTensorCounter):
        return sorted(tool.last)
    if isinstance(tool, lt.Laser):
        return sorted(tool.trackers)
    return sorted(collected)


@pytest.mark.parametrize("kind", ["laser", "counter", "recorder"])
def test_names_survive_a_raising_submodule_and_match_laser(kind):
    torch.manual_seed(0)
    x = torch.randn(300, 160)
    collected: list[str] = []

    def make():
        if kind == "laser":
            return lt.Laser(lt.LaserConfig(tau=0.05, rank=8, max_rank=32))
        if kind == "counter":
            return SavedTensorCounter()
        return ActivationRecorder(lambda site, role, call, X: collected.append(site),
                                  min_width=128, min_rows=32)

    net = Net()
    fresh = make()
    fresh.watch(net)
    clean = _names(fresh, net, x, collected)
    assert any(n.startswith("z/#") for n in clean)  # the top-level save has label ""

    tool = make()
    tool.watch(net)
    net.boom.armed = True
    with pytest.raises(ValueError), tool.compress(), tool.role("z"):
        net(x)
    net.boom.armed = False
    if kind == "laser":
        tool.trackers.clear()
    assert _names(tool, net, x, collected) == clean  # no leaked "boom" label in the names

    laser = lt.Laser(lt.LaserConfig(tau=0.05, rank=8, max_rank=32))
    laser.watch(net)
    laser_sites = _names(laser, net, x, [])
    assert set(laser_sites) <= set(clean)  # Laser's sites are among the tool's names


def test_recorder_applies_laser_exclusion_rules():
    """The recorder keeps out what Laser keeps raw, under the same reasons (one definition,
    eligibility.ineligible): a saved view of a parameter is a "parameter" (no extra memory), a
    cast copy of it a "weight copy"; the activation itself is reported."""
    lin = torch.nn.Linear(160, 160, bias=False)
    x = torch.randn(300, 160)
    seen: list[str] = []
    rec = ActivationRecorder(lambda site, role, call, X: seen.append(site), min_rows=32)
    rec.watch(lin)
    with rec.compress():
        h = torch.relu(lin(x))
        out = (h @ lin.weight.t()).sum()  # saves h and a view of the weight
        out = out + (h @ lin.weight.t().to(torch.bfloat16).float()).sum()  # and a cast copy
        out.backward()
    assert rec.skipped.get("parameter", 0) >= 1
    assert rec.skipped.get("weight copy", 0) >= 1
    assert seen  # the activations themselves are reported


def test_recorder_recognizes_parameters_after_model_to():
    """Like Laser, the recorder re-reads the watched parameters at compress(): a frozen weight
    whose storage model.to(dtype) replaced is still a "parameter", not a weight copy."""
    lin = torch.nn.Linear(160, 160, bias=False).requires_grad_(False)
    rec = ActivationRecorder(lambda *a: None, min_rows=32)
    rec.watch(lin)
    lin.to(torch.bfloat16)
    x = torch.randn(300, 160, dtype=torch.bfloat16, requires_grad=True)
    with rec.compress():
        lin(x).float().sum().backward()  # saves the frozen weight (for x's gradient)
    assert rec.skipped.get("parameter", 0) == 1 and "weight copy" not in rec.skipped
