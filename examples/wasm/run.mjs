// node run.mjs NET.wasm NET.weights.bin INPUT.f32 BATCH OUTPUT.f32
//
// The forward pass of BATCH samples read from INPUT.f32 (raw little-endian float32, NCHW;
// float64 for a float64 network), written to OUTPUT.f32 the same way: what the tests
// compare with the Python module's.
import { readFileSync, writeFileSync } from "node:fs";
import { loadNetwork } from "./cnnc_loader.mjs";

const [wasmPath, weightsPath, inputPath, batchText, outputPath] = process.argv.slice(2);
if (!outputPath) {
  console.error("usage: node run.mjs NET.wasm NET.weights.bin INPUT.f32 BATCH OUTPUT.f32");
  process.exit(2);
}
try {
  const net = await loadNetwork(readFileSync(wasmPath), readFileSync(weightsPath));
  const bytes = readFileSync(inputPath);
  const size = net.Scalars.BYTES_PER_ELEMENT;
  const x = new net.Scalars(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength),
    0, Math.floor(bytes.byteLength / size));
  const y = net.forward(x, Number(batchText));
  writeFileSync(outputPath, Buffer.from(y.buffer, y.byteOffset, y.byteLength));
  net.free();
  console.log(`${net.name}: ${Number(batchText)} samples, ${net.outputSize} outputs each`);
} catch (error) {
  console.error(`run.mjs: ${error.message}`);
  process.exit(1);
}
