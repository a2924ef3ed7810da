"""`cnnc compile --emit dot`: the layer graph as Graphviz text, read back here with a small
parser of its own (no graphviz needed): one node a layer, one edge a data flow."""

from __future__ import annotations

import re

import cnnc
from conftest import EXAMPLES, run_cli

NODE = re.compile(r'^  "(?P<name>[^"]+)" \[label="(?P<label>(?:[^"\\]|\\.)*)"\];$')
EDGE = re.compile(r'^  "(?P<source>[^"]+)" -> "(?P<target>[^"]+)";$')

BRANCHES = """network br
input x: 3x8x8
conv a: 4 3x3 pad=1 -> relu
conv b: 4 1x1 from=x
add s: a, b
concat k: s, a
maxpool 2x2
dense out: 5
"""


def parsed(text: str) -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
    """(node -> its label's lines, edges); every line of the body is a node, an edge or an
    attribute statement, and the graph is one digraph."""
    lines = text.splitlines()
    assert re.fullmatch(r'digraph "[^"]+" \{', lines[0]) and lines[-1] == "}"
    nodes, edges = {}, []
    for line in lines[1:-1]:
        if node := NODE.match(line):
            nodes[node["name"]] = node["label"].split("\\n")
        elif edge := EDGE.match(line):
            edges.append((edge["source"], edge["target"]))
        else:
            assert re.fullmatch(r"  (rankdir=TB|node \[.*\]);", line), line
    assert all(s in nodes and t in nodes for s, t in edges)
    return nodes, edges


def emitted(capsys, tmp_path, program: str) -> str:
    path = tmp_path / "net.cnn"
    path.write_text(program)
    code, out, err = run_cli(capsys, "compile", str(path), "--emit", "dot")
    assert code == 0 and err == ""
    return out


def test_a_branching_program_has_a_node_a_layer_and_its_forks_and_joins(capsys, tmp_path):
    nodes, edges = parsed(emitted(capsys, tmp_path, BRANCHES))
    assert list(nodes) == ["x", "a", "b", "s", "k", "maxpool1", "out"]
    assert sorted(edges) == sorted([("x", "a"), ("x", "b"), ("a", "s"), ("b", "s"),
                                    ("s", "k"), ("a", "k"), ("k", "maxpool1"),
                                    ("maxpool1", "out")])
    # name, ops, one sample's output shape, parameters: 4 filters of 3x3x3 and 4 biases
    assert nodes["a"] == ["conv a", "conv2d + bias_add + relu", "4x8x8", "112 parameters"]
    assert nodes["k"] == ["concat k", "concat", "8x8x8", "0 parameters"]
    assert nodes["out"] == ["dense out", "dense + bias_add", "5", f"{8 * 4 * 4 * 5 + 5} parameters"]
    assert nodes["x"] == ["input x", "3x8x8"]


def test_resnet20_has_every_layer_and_a_second_edge_into_each_add(capsys, tmp_path):
    nodes, edges = parsed(emitted(capsys, tmp_path, (EXAMPLES / "resnet20.cnn").read_text()))
    layers = cnnc.check(EXAMPLES / "resnet20.cnn").layers
    assert list(nodes) == [layer.name for layer in layers]
    adds = [name for name, label in nodes.items() if label[0].startswith("add ")]
    assert len(adds) == 9  # one a residual block
    # every layer but the input reads one other, an add two
    assert len(edges) == len(nodes) - 1 + len(adds)
    into = {name: [s for s, t in edges if t == name] for name in nodes}
    assert all(len(into[name]) == (2 if name in adds else 1) for name in list(nodes)[1:])
    assert into["layer2.0.downsample.0"] == ["layer1.2.out"]  # the projection's from=in


def test_emit_dot_writes_the_file_o_names(capsys, tmp_path):
    (tmp_path / "net.cnn").write_text(BRANCHES)
    code, out, _ = run_cli(capsys, "compile", str(tmp_path / "net.cnn"), "--emit", "dot",
                           "-o", str(tmp_path / "net.dot"))
    assert code == 0 and out == ""
    assert parsed((tmp_path / "net.dot").read_text())[0]["s"][0] == "add s"
