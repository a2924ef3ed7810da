"""What `cnnc train` and `cnnc eval` tell the user: the compile time, progress with ETA, epoch
times, the metrics log, the best epoch's weights, the plot, which samples eval scored."""

from __future__ import annotations

import gzip
import io
import json
import struct

import numpy as np
import pytest

import cnnc
from cnnc.cli.main import main
from cnnc.training.progress import Progress, clock
from conftest import EXAMPLES

SMALL = ("network small\ninput: 1x6x6\nconv c: 3 3x3 -> relu\nmaxpool 2x2\n"
         "dense out: 3 -> softmax\nloss cross_entropy\ntrain sgd lr=0.1 momentum=0.9 seed=4\n")


def synthetic(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, count)
    x = rng.standard_normal((count, 1, 6, 6)).astype(np.float32) * 0.3
    x[np.arange(count), 0, y, y] += 2.0
    return x, y


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "small.cnn").write_text(SMALL)
    x, y = synthetic(100, 0)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    return tmp_path


def test_train_says_compile_time_and_epoch_times_and_logs_every_epoch(workdir, capsys):
    assert main(["train", "small.cnn", "--data", "d.npz", "--epochs", "3", "--batch", "16",
                 "--no-progress", "--log", "m.jsonl", "--save-best"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("compiled small.cnn for cpu in ") and out[0].endswith(" s")
    epochs = [line for line in out if line.startswith("epoch ")]
    assert len(epochs) == 3 and all(line.endswith(" s)") for line in epochs)
    records = [json.loads(line) for line in (workdir / "m.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert [r["steps"] for r in records] == [5, 10, 15]  # 80 samples, batch 16
    assert all(r["lr"] == 0.1 and r["time"] > 0 for r in records)
    for line, record in zip(epochs, records, strict=True):
        assert f"training loss {record['loss']:.4f}, held-out loss " \
               f"{record['held_out_loss']:.4f}, accuracy {record['accuracy']:.2%}" in line


def test_save_best_keeps_the_lowest_held_out_loss(workdir, capsys):
    """The best file scores, on the held-out split, the lowest held-out loss of the log,
    and the final weights score the last epoch's."""
    assert main(["train", "small.cnn", "--data", "d.npz", "--epochs", "6", "--batch", "8",
                 "--lr", "0.5", "--no-progress", "--log", "m.jsonl",
                 "--save-best", "best.npz"]) == 0
    records = [json.loads(line) for line in (workdir / "m.jsonl").read_text().splitlines()]
    best = min(r["held_out_loss"] for r in records)
    capsys.readouterr()
    for weights, expected in (("best.npz", best), ("small.weights.npz",
                                                   records[-1]["held_out_loss"])):
        assert main(["eval", "small.cnn", "--weights", weights, "--data", "d.npz"]) == 0
        shown = capsys.readouterr().out.splitlines()[-1]
        assert f"loss {expected:.4f}" in shown, (weights, shown, records)
    improved = sum(r["held_out_loss"] == min(q["held_out_loss"] for q in records[:i + 1])
                   for i, r in enumerate(records))
    assert improved >= 1


def test_resumed_log_is_appended(workdir, capsys):
    assert main(["train", "small.cnn", "--data", "d.npz", "--epochs", "1", "--no-progress",
                 "--log", "m.jsonl"]) == 0
    assert main(["train", "small.cnn", "--data", "d.npz", "--epochs", "2", "--no-progress",
                 "--log", "m.jsonl", "--resume", "small.ckpt.npz"]) == 0
    records = [json.loads(line) for line in (workdir / "m.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]


def test_progress_on_a_pipe_is_a_line_every_n_seconds(monkeypatch):
    stream = io.StringIO()
    now = [100.0]
    monkeypatch.setattr("cnnc.training.progress.time.perf_counter", lambda: now[0])
    bar = Progress(2, 5, 1000, stream=stream, every=10.0)
    for seen in range(100, 1001, 100):
        now[0] += 3.0  # 3 s a step: lines at 12 and 24 s (10 s apart at least); at 30 s
        # the epoch is done and its own line follows
        bar.update(seen, 0.5)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines == ["epoch 2/5: 400/1,000 samples, loss 0.5000, 0:12 elapsed, about 0:18 left",
                     "epoch 2/5: 800/1,000 samples, loss 0.5000, 0:24 elapsed, about 0:06 left"]
    assert "\r" not in stream.getvalue()


def test_progress_on_a_terminal_redraws_with_elapsed_and_eta(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream, now = Terminal(), [0.0]
    monkeypatch.setattr("cnnc.training.progress.time.perf_counter", lambda: now[0])
    bar = Progress(1, 1, 200, stream=stream)
    now[0] = 30.0
    bar.update(50, 1.25)
    bar.close()
    assert stream.getvalue() == ("\repoch 1/1 [######..................] 50/200 loss 1.2500 "
                                 "2 samples/s 0:30<1:30\n")
    assert clock(3725) == "1:02:05"


def write_idx(path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">i", magic) + b"".join(struct.pack(">i", d) for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture
def mnist_like(tmp_path):
    """A folder with train-* (60 digits) and t10k-* (20) files of 1x6x6 'images'."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "digits"
    folder.mkdir()
    for stem, count in (("train", 60), ("t10k", 20)):
        write_idx(folder / f"{stem}-images-idx3-ubyte.gz",
                  rng.integers(0, 256, (count, 6, 6)), 2051)
        write_idx(folder / f"{stem}-labels-idx1-ubyte.gz", rng.integers(0, 3, count), 2049)
    return folder


def test_eval_splits_of_a_folder_with_both(tmp_path, mnist_like, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = cnnc.compile(SMALL, opt_level=1)
    module.save("small.cnnm")
    module.save_weights("w.npz")
    counts = {"heldout": 20, "test": 20, "train": 60, "all": 80}
    for split, count in counts.items():
        assert main(["eval", "small.cnnm", "--weights", "w.npz", "--data", str(mnist_like),
                     "--split", split]) == 0
        assert f"small on {count} " in capsys.readouterr().out, split
    from cnnc.training.data import load_mnist_split

    test = load_mnist_split(mnist_like, "test")
    main(["eval", "small.cnnm", "--weights", "w.npz", "--data", str(mnist_like)])
    loss = module.evaluate(test.x, test.y)["loss"]
    assert f"held-out samples ({mnist_like}'s t10k-* files): loss {loss:.4f}" in \
        capsys.readouterr().out


def test_eval_of_one_split_scores_what_train_held_out(workdir, capsys):
    """The default scores exactly the held-out samples of train's seeded split."""
    from cnnc.training.data import hold_out, load_npz

    module = cnnc.compile(SMALL, opt_level=1)
    module.save_weights("w.npz")
    whole = load_npz(workdir / "d.npz")
    for seed, fraction in ((4, 0.2), (9, 0.3)):
        _, held = hold_out(whole, fraction, seed)
        expected = module.evaluate(held.x, held.y)
        argv = ["eval", "small.cnn", "--weights", "w.npz", "--data", "d.npz",
                "--val-split", str(fraction)]
        argv += ["--seed", str(seed)] if seed != 4 else []  # 4 is the train line's
        assert main(argv) == 0
        shown = capsys.readouterr().out
        assert f"small on {len(held)} held-out samples (--val-split {fraction:g} with seed " \
               f"{seed} of the 100 in d.npz" in shown
        assert f"loss {expected['loss']:.4f}, accuracy {expected['accuracy']:.2%}" in shown
    assert main(["eval", "small.cnn", "--weights", "w.npz", "--data", "d.npz",
                 "--split", "test"]) == 1
    assert "no test split" in capsys.readouterr().err


def test_plot_draws_the_logged_values(tmp_path):
    pytest.importorskip("matplotlib")
    from cnnc.cli.plot import figure, read_log

    log = tmp_path / "m.jsonl"
    records = [{"epoch": 1, "loss": 0.9, "held_out_loss": 0.7, "accuracy": 0.8},
               {"epoch": 2, "loss": 0.5, "held_out_loss": 0.6, "accuracy": 0.85}]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    fig = figure(read_log(log))
    lines = {line.get_label(): list(line.get_ydata()) for axes in fig.axes
             for line in axes.get_lines()}
    assert lines == {"training loss": [0.9, 0.5], "held-out loss": [0.7, 0.6],
                     "held-out accuracy": [0.8, 0.85]}
    assert main(["plot", str(log), "-o", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("content, message", [
    ("", "holds no epochs"),
    ("{not json\n", "m.jsonl:1: not a JSON line"),
    ('{"epoch": 1, "loss": 0.5}\n[1]\n', "m.jsonl:2: not a JSON object"),
    ('{"epoch": "1", "loss": 0.5}\n', "its epoch must be an integer"),
    ('{"epoch": 1, "loss": NaN}\n', "its loss must be a finite number"),
])
def test_plot_refuses_a_bad_log(tmp_path, capsys, content, message):
    (tmp_path / "m.jsonl").write_text(content)
    assert main(["plot", str(tmp_path / "m.jsonl"), "-o", str(tmp_path / "c.png")]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()


def test_check_grad_checks_small_parameters_whole_and_says_what_it_sampled(capsys):
    assert main(["check", "--grad", str(EXAMPLES / "mlp.cnn"), "--samples", "50"]) == 0
    out = capsys.readouterr().out
    graph = cnnc.check(EXAMPLES / "mlp.cnn")
    for param in graph.params:
        line = next(row for row in out.splitlines() if row.startswith(param.name + " "))
        if param.size <= 50:
            assert line.rstrip().endswith(f"all {param.size:,}")
        else:
            assert f"50 of {param.size:,} (sampled)" in line
    assert "sampled at 50 elements (--samples)" in out
    assert main(["check", "--grad", str(EXAMPLES / "mlp.cnn"), "--samples", "0"]) == 1
