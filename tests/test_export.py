"""save/load: readable Python that trains as the saved module does."""

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
    with pytest.raises(rewriter.InputError, match="no module.py"):
        rewriter.load(tmp_path)


def test_save_needs_a_rewritten_module(tmp_path):
    with pytest.raises(rewriter.InputError, match="GraphModule"):
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
