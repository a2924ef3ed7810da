"""Property-based tests: no input makes the front end raise anything but a CnncError, and
every valid program drawn from the grammar's forms checks with the directly computed shapes."""

from __future__ import annotations

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from programs import valid_programs

from cnnc.diagnostics import CnncError, Source
from cnnc.driver.pipeline import front_end
from cnnc.graph.ir import verify

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def front_end_or_cnnc_error(text: str) -> None:
    try:
        front_end(Source(text, "h.cnn"))
    except CnncError as error:
        assert error.diagnostics, "a CnncError must say what is wrong"
        assert str(error)  # renders without raising


@FAST
@given(st.text(max_size=200))
def test_random_text_raises_only_cnnc_errors(text):
    front_end_or_cnnc_error(text)


ALPHABET = "networkinputconvmaxpoolavgdenseflattenlosstrainrelusoftmax0123456789x:=->#. \n\t_-"


@FAST
@given(st.text(alphabet=ALPHABET, max_size=300))
def test_language_shaped_noise_raises_only_cnnc_errors(text):
    front_end_or_cnnc_error(text)


# -- valid programs, generated with their expected shapes ---------------------------------------


@FAST
@given(valid_programs())
def test_valid_programs_check_with_directly_computed_shapes(case):
    text, expected = case
    graph = front_end(Source(text, "gen.cnn"))
    verify(graph)
    got = [tuple(graph.tensor(layer.output).shape[1:]) for layer in graph.layers[1:]]
    assert got == expected


def mutate(tokens: list[str], data) -> list[str]:
    position = data.draw(st.integers(0, len(tokens) - 1))
    action = data.draw(st.sampled_from(["delete", "duplicate", "swap"]))
    result = list(tokens)
    if action == "delete":
        del result[position]
    elif action == "duplicate":
        result.insert(position, result[position])
    else:
        other = data.draw(st.integers(0, len(tokens) - 1))
        result[position], result[other] = result[other], result[position]
    return result


@FAST
@given(valid_programs(), st.data())
def test_mutated_valid_programs_raise_only_cnnc_errors(case, data):
    text, _ = case
    # tokens are words and line breaks, so a mutation can also join or split lines
    tokens = text.replace("\n", " \n ").split(" ")
    tokens = [t for t in tokens if t]
    assume(len(tokens) > 1)
    for _ in range(data.draw(st.integers(1, 3))):
        tokens = mutate(tokens, data)
    front_end_or_cnnc_error(" ".join(tokens))
