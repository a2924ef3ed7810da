// node run.mjs NET.wasm NET.weights.bin INPUT.f32 BATCH OUTPUT.f32
//
// The forward pass of BATCH samples read from INPUT.f32 (raw little-endian float32, NCHW),
// written to OUTPUT.f32 the same way: what the tests compare with the Python module's.
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
  const x = new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
  const y = net.forward(x, Number(batchText));
  writeFileSync(outputPath, Buffer.from(y.buffer, y.byteOffset, y.byteLength));
  net.free();
  console.log(`${net.name}: ${Number(batchText)} samples, ${net.outputSize} outputs each`);
} catch (error) {
  console.error(`run.mjs: ${error.message}`);
  process.exit(1);
}
