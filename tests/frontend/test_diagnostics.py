from cnnc.diagnostics import CnncError, Diagnostic, Note, Source, Span, render_diagnostic


def test_caret_spans_the_fault_under_the_quoted_line():
    source = Source("network n\nconv c1: 5x5 -> relu\n", "f.cnn")
    text = render_diagnostic(Diagnostic("bad", Span("f.cnn", 2, 10, 2, 13)), source)
    assert text.splitlines() == [
        "f.cnn:2:10: error: bad",
        "    conv c1: 5x5 -> relu",
        "             ^~~",
    ]


def test_notes_without_span_follow_and_notes_with_span_quote_their_line():
    source = Source("a\nbb\n", "f.cnn")
    diag = Diagnostic("m", Span("f.cnn", 2, 1, 2, 3),
                      (Note("plain"), Note("here", Span("f.cnn", 1, 1, 1, 2))))
    assert render_diagnostic(diag, source).splitlines() == [
        "f.cnn:2:1: error: m", "    bb", "    ^~",
        "note: plain",
        "f.cnn:1:1: note: here", "    a", "    ^",
    ]


def test_caret_at_end_of_line_and_tabs_keep_columns():
    source = Source("\tloss\n", "f.cnn")
    lines = render_diagnostic(Diagnostic("m", Span.point("f.cnn", 1, 6)), source).splitlines()
    assert lines[1:] == ["     loss", "         ^"]


def test_error_without_span_names_the_file():
    error = CnncError.single("cannot", None, source=Source("", "x.cnn"))
    assert str(error) == "x.cnn: error: cannot"


def test_quoted_line_counts_only_newlines_as_line_ends():
    # form feeds and U+2028 are not line ends for the parser, so not for the quote either
    source = Source("network n # a\u2028b\f\ninput: 1x4x4\nconv 0 3x3\n", "f.cnn")
    lines = render_diagnostic(Diagnostic("m", Span.point("f.cnn", 3, 6)), source).splitlines()
    assert lines[1:] == ["    conv 0 3x3", "         ^"]
