"""ONNX in and out: `importer` turns an ONNX model into a .cnn program and its weights; `export`
writes a network's inference graph as ONNX. Both need the `onnx` package (`pip install
'cnnc[onnx]'`), imported only when used."""
