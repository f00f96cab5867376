"""save/load: readable Python that trains as the saved module does."""

import hashlib
import json
import re

import pytest
import torch

import rewriter
from examples.zoo import ZOO
from tests.test_optimize import assert_trains_like


@pytest.mark.parametrize("name", ["resnet18", "dropout", "densenet_bc"])
def test_saved_module_loads_and_trains_identically(name, tmp_path):
    zoo = ZOO[name]
    model, x = zoo.test_model(), zoo.test_input()
    budget = int(0.7 * rewriter.measure_peak(model, x))
    try:
        optimized = rewriter.optimize(model, budget, x)
    except rewriter.BudgetError as error:
        optimized = rewriter.apply_plan(model, error.plan)
    rewriter.save(optimized, tmp_path)
    loaded = rewriter.load(tmp_path)

    assert list(loaded.state_dict()) == list(model.state_dict())
    assert loaded.plan == optimized.plan
    assert rewriter.measure_peak(loaded, x) == rewriter.measure_peak(optimized, x)
    assert_trains_like(zoo.test_model(), loaded, loaded, x)


@pytest.mark.parametrize("name, strategies", [("bn_leaky_chain", "invert"), ("revnet", "invert")])
def test_saved_invert_chains_load_and_train_identically(name, strategies, tmp_path):
    zoo = ZOO[name]
    model, x = zoo.test_model(), zoo.test_input()
    budget = int(0.6 * rewriter.measure_peak(model, x))
    try:
        optimized = rewriter.optimize(model, budget, x, strategies=strategies)
    except rewriter.BudgetError as error:
        optimized = rewriter.apply_plan(model, error.plan)
    assert optimized.plan.inverted
    rewriter.save(optimized, tmp_path)
    code = (tmp_path / "module.py").read_text()
    assert code.count("rewriter.export.invert_chain(") == len(optimized.plan.inverted)
    loaded = rewriter.load(tmp_path)
    assert list(loaded.state_dict()) == list(model.state_dict())
    assert rewriter.measure_peak(loaded, x) == rewriter.measure_peak(optimized, x)
    reference = zoo.test_model()
    torch.manual_seed(7)
    loaded(x).sum().backward()
    torch.manual_seed(7)
    reference(x).sum().backward()
    for (n, p), (_, q) in zip(reference.named_parameters(), loaded.named_parameters()):
        assert torch.linalg.vector_norm(q.grad - p.grad) <= 1e-4 * torch.linalg.vector_norm(p.grad) + 1e-6, n


def test_saved_code_is_readable_python_importing_torch_and_rewriter_only(tmp_path):
    zoo = ZOO["resnet18"]
    model, x = zoo.test_model(), zoo.test_input()
    optimized = rewriter.optimize(model, int(0.6 * rewriter.measure_peak(model, x)), x)
    assert optimized.plan.segments or optimized.plan.spans
    rewriter.save(optimized, tmp_path)
    code = (tmp_path / "module.py").read_text()
    imported = set(re.findall(r"^(?:import|from) ([\w.]+)", code, flags=re.M))
    assert {name.split(".")[0] for name in imported} <= {"torch", "rewriter", "math"}
    assert "class ResNet(torch.nn.Module)" in code
    assert "def forward(self, x):" in code
    assert code.count("rewriter.export.segment(") == len(optimized.plan.segments) + len(optimized.plan.spans)


def test_load_needs_a_saved_folder(tmp_path):
    with pytest.raises(rewriter.InputError, match="no manifest.json"):
        rewriter.load(tmp_path)


def test_save_needs_a_rewritten_module(tmp_path):
    with pytest.raises(rewriter.InputError, match="optimize\\(\\), apply_plan\\(\\) or load\\(\\)"):
        rewriter.save(torch.nn.Linear(2, 2), tmp_path)


def test_saved_fork_joins_load_and_train_identically(tmp_path):
    from tests.test_invert import ForkJoin, assert_same_training, inverted

    torch.manual_seed(0)
    model, reference = ForkJoin(depth=2).train(), ForkJoin(depth=2).train()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 12, 10)
    gm, chains = inverted(model, x)
    rewriter.save(gm, tmp_path)
    loaded = rewriter.load(tmp_path)
    assert "rewriter.export.invert_chain(" in (tmp_path / "module.py").read_text()
    assert rewriter.measure_peak(loaded, x) == rewriter.measure_peak(gm, x)
    assert_same_training(reference, loaded, loaded, x)


def _saved(folder):
    zoo = ZOO["resnet18"]
    model, x = zoo.test_model(), zoo.test_input()
    optimized = rewriter.optimize(model, int(0.6 * rewriter.measure_peak(model, x)), x, strategies="recompute")
    rewriter.save(optimized, folder)
    return zoo, model, optimized, x


def test_the_folder_holds_no_pickle_and_a_manifest_of_every_file(tmp_path):
    _saved(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["leaves.json", "manifest.json", "module.py", "plan.json",
                                                          "tensors.pt"]
    torch.load(tmp_path / "tensors.pt", weights_only=True)  # tensors only
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["leaves.json", "module.py", "plan.json", "tensors.pt"]


def test_a_changed_module_py_is_refused_before_it_runs(tmp_path):
    _saved(tmp_path)
    marker = tmp_path.parent / f"{tmp_path.name}_ran"
    code = tmp_path / "module.py"
    code.write_text(f"open({str(marker)!r}, 'w').close()\n" + code.read_text())
    with pytest.raises(rewriter.InputError, match="module.py has changed since it was saved"):
        rewriter.load(tmp_path)
    assert not marker.exists()


def test_tampered_tensors_are_refused(tmp_path):
    _saved(tmp_path)
    with open(tmp_path / "tensors.pt", "ab") as tensors:
        tensors.write(b"\0")
    with pytest.raises(rewriter.InputError, match="tensors.pt has changed since it was saved"):
        rewriter.load(tmp_path)


def _rewrite(folder, name, text):
    """Replace a file and its manifest entry (damage the manifest does not catch)."""
    (folder / name).write_text(text)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, says", [
    (lambda f: (f / "manifest.json").write_text("{not json"), "manifest.json cannot be read"),
    (lambda f: (f / "plan.json").unlink(), "plan.json is missing"),
    (lambda f: _rewrite(f, "plan.json", "{not json"), "plan.json cannot be read"),
    (lambda f: _rewrite(f, "leaves.json", "[]"), "leaves.json"),
])
def test_a_damaged_folder_is_an_input_error_naming_the_file(tmp_path, damage, says):
    _saved(tmp_path)
    damage(tmp_path)
    with pytest.raises(rewriter.InputError, match=re.escape(says)):
        rewriter.load(tmp_path)


def test_a_folder_of_the_pickled_format_is_refused_with_the_reason(tmp_path):
    (tmp_path / "module.py").write_text("")
    torch.save({"modules": {}}, tmp_path / "leaves.pt")
    with pytest.raises(rewriter.InputError, match="earlier rewriter"):
        rewriter.load(tmp_path)


def test_a_loaded_module_saves_again_and_trains_alike(tmp_path):
    zoo, model, optimized, x = _saved(tmp_path / "first")
    loaded = rewriter.load(tmp_path / "first")
    rewriter.save(loaded, tmp_path / "second")
    again = rewriter.load(tmp_path / "second")
    assert again.plan == optimized.plan
    assert (tmp_path / "second" / "module.py").read_text() == (tmp_path / "first" / "module.py").read_text()
    assert_trains_like(zoo.test_model(), again, again, x)


class _Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.sigmoid  # a function: code, not data

    def forward(self, x):
        return self.scale(x) if x.sum() > 0 else x  # data-dependent: an opaque leaf


class _WithFunction(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.gate = _Scaled()

    def forward(self, x):
        return self.gate(self.conv(x))


def test_a_layer_holding_code_is_refused_by_name_and_the_folder_left_alone(tmp_path):
    model, x = _WithFunction().train(), torch.ones(2, 3, 8, 8)
    applied = rewriter.apply_plan(model, rewriter.explain(model, x))
    with pytest.raises(rewriter.InputError, match="attribute 'scale'"):
        rewriter.save(applied, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_monai_network_saves_and_loads(tmp_path):
    """MONAI annotates forward's inputs as text (`from __future__ import annotations`):
    the saved code gives the annotation's name its text."""
    nets = pytest.importorskip("monai.networks.nets")

    def build():
        torch.manual_seed(0)
        return nets.UNet(2, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1).train()

    model, x = build(), torch.randn(2, 1, 32, 32)
    optimized = rewriter.optimize(model, int(0.6 * rewriter.measure_peak(model, x)), x, strategies="recompute")
    rewriter.save(optimized, tmp_path)
    loaded = rewriter.load(tmp_path)
    assert rewriter.measure_peak(loaded, x) == rewriter.measure_peak(optimized, x)
    assert_trains_like(build(), loaded, loaded, x)
