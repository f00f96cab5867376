"""The command line, run as a user runs it: `python -m rewriter ...` in a subprocess."""

import subprocess
import sys
from pathlib import Path

import pytest

import rewriter

ROOT = Path(__file__).resolve().parents[1]
CHAIN = ["examples.zoo.plain:BNLeakyChain", "--kwargs", '{"channels": 4, "depth": 3}', "--input", "2x3x16x16"]


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rewriter", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_help_names_every_command():
    done = run("--help")
    assert done.returncode == 0
    for command in ("explain", "plan", "fit"):
        assert command in done.stdout
    assert "--budget" in run("plan", "--help").stdout


def test_explain_prints_the_table_and_the_predicted_peak():
    done = run("explain", *CHAIN, "--quiet")
    assert done.returncode == 0, done.stderr
    assert "predicted peak" in done.stdout and "BatchNorm2d" in done.stdout


def test_plan_from_a_file_saves_a_module_that_loads_with_its_plan(tmp_path):
    out = tmp_path / "plan"
    unet = str(ROOT / "examples" / "zoo" / "unet.py") + ":UNet"
    done = run("plan", unet, "--kwargs", '{"base": 8, "levels": 3}', "--input", "2x3x64x64", "--budget", "4MB",
               "--strategies", "recompute", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "predicted peak" in done.stdout and "budget" in done.stdout
    assert "solve" in done.stderr and "verify" in done.stderr  # the phases, logged at INFO
    loaded = rewriter.load(out)
    assert loaded.plan.budget_bytes == 4_000_000
    assert loaded.plan.predicted_peak_bytes <= 4_000_000
    assert loaded.plan.segments or loaded.plan.spans


def test_a_budget_nothing_reaches_exits_3_naming_the_minimum():
    done = run("plan", *CHAIN, "--budget", "1KB", "--quiet")
    assert done.returncode == 3
    assert "smallest reachable peak" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("model, says", [
    ("examples.zoo.plain", "name a factory"),
    ("examples.zoo.plain:NoSuchModel", "has no 'NoSuchModel'"),
    ("no_such_package.models:build", "cannot import"),
    ("missing/file.py:build", "there is no file"),
])
def test_a_model_that_cannot_be_found_exits_1_saying_why(model, says):
    done = run("explain", model, "--input", "2x3x16x16", "--quiet")
    assert done.returncode == 1
    assert says in done.stderr and "Traceback" not in done.stderr


def test_a_malformed_input_shape_is_refused_by_name():
    done = run("explain", "examples.zoo.plain:BNLeakyChain", "--input", "2x3xsixteen", "--quiet")
    assert done.returncode == 2  # argparse's usage error
    assert "2x3xsixteen" in done.stderr


def test_fit_finds_a_larger_batch_with_rewriting():
    done = run("fit", *CHAIN, "--budget", "100KB", "--strategies", "recompute", "--quiet")
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(":", 1) for line in done.stdout.strip().splitlines())
    plain = int(lines["as it is"].split()[1])
    planned = int(lines["with rewriter"].split()[1])
    assert planned > plain >= 1


def test_plan_draws_its_picture(tmp_path):
    pytest.importorskip("matplotlib")
    done = run("plan", *CHAIN, "--budget", "60KB", "--strategies", "recompute", "--plot", str(tmp_path / "plan.png"),
               "--quiet")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "plan.png").read_bytes()[:4] == b"\x89PNG"


def test_plan_takes_an_optimizers_state_off_a_device_budget():
    done = run("plan", *CHAIN, "--budget", "150KB", "--optimizer", "adam", "--strategies", "recompute", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "on the device" in done.stdout and "optimizer state" in done.stdout


def test_a_monai_network_is_explained():
    pytest.importorskip("monai")
    done = run("explain", "monai.networks.nets:UNet", "--kwargs",
               '{"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": [8, 16], "strides": [2]}',
               "--input", "2x1x32x32", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "predicted peak" in done.stdout


MONAI_UNET = ["monai.networks.nets:UNet", "--kwargs",
              '{"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": [8, 16], "strides": [2]}',
              "--input", "2x1x32x32", "--strategies", "recompute", "--quiet"]


def test_a_monai_network_is_planned_and_fitted():
    pytest.importorskip("monai")
    planned = run("plan", *MONAI_UNET, "--budget", "220KB")
    assert planned.returncode == 0, planned.stderr
    assert "predicted peak" in planned.stdout
    fitted = run("fit", *MONAI_UNET, "--budget", "400KB")
    assert fitted.returncode == 0, fitted.stderr
    lines = dict(line.split(":", 1) for line in fitted.stdout.strip().splitlines())
    assert int(lines["with rewriter"].split()[1]) >= int(lines["as it is"].split()[1])
