"""Cross-entropy in both forms — of logits (the last layer without softmax) and of
probabilities (`-> softmax`) — with and without label smoothing, against
torch.nn.functional.cross_entropy in float64: the numpy reference and the compiled float32
and float64 modules, the CUDA simulator, training, and the errors of the loss line."""

from __future__ import annotations

import numpy as np
import pytest

import cnnc
from cnnc.passes import reference
from cnnc.passes.autodiff import differentiate
from conftest import errors_of

CLASSES, FEATURES, BATCH = 5, 7, 6
FORMS = {"logits": f"dense d: {CLASSES}", "softmax": f"dense d: {CLASSES} -> softmax"}


def program(form: str, eps: float | None, extra: str = "") -> str:
    option = "" if eps is None else f" label_smoothing={eps}"
    return (f"network ce\ninput: {FEATURES}\n{FORMS[form]}\nloss cross_entropy{option}\n"
            f"{extra}")


def problem(seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Inputs, labels and dense parameters large enough that the classes differ clearly."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, FEATURES))
    labels = rng.integers(0, CLASSES, BATCH)
    params = {"d.weight": rng.standard_normal((CLASSES, FEATURES)),
              "d.bias": rng.standard_normal(CLASSES)}
    return x, labels, params


def torch_oracle(x, labels, params, eps: float) -> tuple[float, np.ndarray, np.ndarray]:
    """(loss, d loss / d x, logits) of PyTorch's CrossEntropyLoss on the dense logits."""
    torch = pytest.importorskip("torch")
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    z = xt @ torch.tensor(params["d.weight"]).T + torch.tensor(params["d.bias"])
    loss = torch.nn.functional.cross_entropy(z, torch.tensor(labels), label_smoothing=eps)
    loss.backward()
    return float(loss.detach()), xt.grad.numpy(), z.detach().numpy()


@pytest.mark.parametrize("eps", [None, 0.1, 0.35], ids=["none", "0.1", "0.35"])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_the_reference_is_torchs_cross_entropy(form, eps):
    x, labels, params = problem()
    loss, dx, _ = torch_oracle(x, labels, params, eps or 0.0)
    graph = differentiate(cnnc.check(program(form, eps), dtype="f64"))
    values = reference.run(graph, x, params, labels)
    np.testing.assert_allclose(values[graph.loss], loss, rtol=1e-12)
    np.testing.assert_allclose(values[dict(graph.gradients)[graph.input]], dx, rtol=1e-10,
                               atol=1e-15)


@pytest.mark.parametrize("dtype, rtol", [("f64", 1e-11), ("f32", 2e-5)])
@pytest.mark.parametrize("eps", [None, 0.2], ids=["none", "0.2"])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_compiled_loss_and_input_gradient_are_torchs(form, eps, dtype, rtol):
    x, labels, params = problem(1)
    loss, dx, z = torch_oracle(x, labels, params, eps or 0.0)
    module = cnnc.compile(program(form, eps), dtype=dtype)
    kind = np.float32 if dtype == "f32" else np.float64
    module.set_params({name: value.astype(kind) for name, value in params.items()})
    xs = x.astype(kind)
    np.testing.assert_allclose(module.loss(xs, labels), loss, rtol=rtol)
    scale = np.abs(dx).max()
    np.testing.assert_allclose(module.input_gradient(xs, labels), dx, rtol=rtol,
                               atol=rtol * scale)
    want = z if form == "logits" else np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(module(xs), want, rtol=rtol, atol=rtol)


def test_the_logits_form_is_its_own_op_and_forward_returns_the_logits():
    x, labels, params = problem(2)
    logits = cnnc.compile(program("logits", None), dtype="f64")
    probabilities = cnnc.compile(program("softmax", None), dtype="f64")
    assert logits.manifest["loss"]["kind"] == "softmax_cross_entropy"
    assert probabilities.manifest["loss"]["kind"] == "cross_entropy"
    for module in (logits, probabilities):
        module.set_params(params)
    z = x @ params["d.weight"].T + params["d.bias"]
    np.testing.assert_allclose(logits(x), z, rtol=1e-13)
    np.testing.assert_allclose(probabilities(x).sum(axis=1), 1.0, rtol=1e-13)
    # one loss, whichever form computes it
    assert logits.loss(x, labels) == pytest.approx(probabilities.loss(x, labels), rel=1e-13)
    assert logits.takes_labels
    accuracy = logits.evaluate(x, labels)["accuracy"]
    assert accuracy == pytest.approx(np.mean(z.argmax(axis=1) == labels))


@pytest.mark.parametrize("eps", [None, 0.3], ids=["none", "0.3"])
def test_logits_of_ten_thousand_give_a_finite_exact_loss_in_float32(eps):
    """log-sum-exp after subtracting the row maximum: exp never overflows, and a label
    scored 2·10⁴ below the best class costs about 2·10⁴, not inf."""
    module = cnnc.compile("network big\ninput: 3\ndense d: 3 bias=false\n"
                          f"loss cross_entropy{'' if eps is None else f' label_smoothing={eps}'}\n")
    module.set_params({"d.weight": np.eye(3, dtype=np.float32)})
    z = np.array([[1e4, -1e4, 0.0], [-1e4, 5e3, 1e4]], dtype=np.float32)
    labels = np.array([1, 0])
    loss, dz, _ = torch_oracle(z.astype(np.float64), labels, {"d.weight": np.eye(3),
                                                              "d.bias": np.zeros(3)}, eps or 0.0)
    assert np.isfinite(module.loss(z, labels))
    np.testing.assert_allclose(module.loss(z, labels), loss, rtol=1e-6)
    np.testing.assert_allclose(module.input_gradient(z, labels), dz, rtol=1e-6, atol=1e-7)


def test_train_step_lowers_the_loss_of_logits_with_smoothing():
    """Three separable clusters; the loss with ε = 0.1 cannot reach 0, but falls well below
    its start, and every sample ends up in its class."""
    rng = np.random.default_rng(3)
    centres = np.array([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])
    labels = np.repeat(np.arange(3), 8)
    x = (centres[labels] + 0.3 * rng.standard_normal((24, 2))).astype(np.float32)
    module = cnnc.compile("network clusters\ninput: 2\ndense h: 8 -> tanh\ndense out: 3\n"
                          "loss cross_entropy label_smoothing=0.1\ntrain sgd lr=0.2\n")
    first = module.loss(x, labels)
    losses = [module.train_step(x, labels) for _ in range(60)]
    assert losses[0] == pytest.approx(first, rel=1e-6)
    assert losses[-1] < 0.5 * first
    assert (module(x).argmax(axis=1) == labels).all()


def test_the_cuda_simulator_computes_the_logits_loss_and_its_gradient():
    cuda = pytest.importorskip("numba.cuda", reason="numba is not installed")
    if not cuda.is_available():
        pytest.skip("no CUDA GPU and no simulator (NUMBA_ENABLE_CUDASIM=1)")
    text = program("logits", 0.25)
    module = cnnc.compile(text, target="cuda", dtype="f64")
    x, labels, params = problem(4)
    module.set_params(params)
    loss, dx, z = torch_oracle(x, labels, params, 0.25)
    np.testing.assert_allclose(module(x), z, rtol=1e-12)
    np.testing.assert_allclose(module.loss(x, labels), loss, rtol=1e-12)
    np.testing.assert_allclose(module.input_gradient(x, labels), dx, rtol=1e-10, atol=1e-15)


def test_the_ir_prints_the_smoothing_only_where_it_is_given():
    smoothed = cnnc.check(program("logits", 0.1))
    plain = cnnc.check(program("softmax", None))
    [loss] = [node for node in smoothed.nodes if node.output == "loss"]
    assert loss.op == "softmax_cross_entropy" and loss.attrs.text() == " label_smoothing=0.1"
    [loss] = [node for node in plain.nodes if node.output == "loss"]
    assert loss.op == "cross_entropy" and loss.attrs.text() == ""


@pytest.mark.parametrize("value", ["1.5", "1", "-0.1"])
def test_label_smoothing_outside_zero_to_one_is_refused(value):
    assert errors_of(program("logits", None).replace("loss cross_entropy",
                                                     f"loss cross_entropy label_smoothing={value}")
                     ) == [(4, 36, "loss cross_entropy: label_smoothing expects a number from 0 "
                                   f"up to (not including) 1, got {value}")]


def test_a_softmax_before_the_last_layer_is_still_an_error():
    errors = errors_of(f"network ce\ninput: {FEATURES}\ndense a: 4 -> softmax\n"
                       f"dense d: {CLASSES}\nloss cross_entropy\n")
    assert errors == [(3, 15, "softmax must be the last layer before loss cross_entropy, but "
                              "dense d follows it")]


def test_logits_must_be_one_vector_a_sample():
    errors = errors_of("network ce\ninput: 1x4x4\nconv c: 2 3x3\nloss cross_entropy\n")
    assert errors == [(4, 1, "loss cross_entropy needs a vector of class scores, but conv c "
                             "gives 2x2x2; add a dense layer before it")]
