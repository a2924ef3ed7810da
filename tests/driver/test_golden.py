"""Golden texts of `--emit ast|ir|kernels|loops` for every example (pytest --update-golden).

The loops are the plain ones (--no-schedule): scheduled loops depend on the host's vector
width and are checked by value in test_schedule.py instead."""

import pytest

from cnnc.cli.main import main
from conftest import EXAMPLES, GOLDEN, REPO

EXAMPLE_NAMES = sorted(p.stem for p in EXAMPLES.glob("*.cnn"))


@pytest.mark.parametrize("stage", ["ast", "ir", "kernels", "loops"])
@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_emit_matches_golden(capsys, monkeypatch, update_golden, name, stage):
    monkeypatch.chdir(REPO)
    assert main(["compile", f"examples/{name}.cnn", "--emit", stage, "--no-schedule"]) == 0
    out = capsys.readouterr().out
    golden = GOLDEN / f"{name}.{stage}"
    if update_golden:
        golden.write_text(out, encoding="utf-8")
    assert out == golden.read_text(encoding="utf-8")


def test_every_required_example_exists():
    assert {"lenet", "mlp", "vgg_small"} <= set(EXAMPLE_NAMES)
