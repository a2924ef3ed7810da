// Load a network that `cnnc compile NET.cnn --emit lib --triple wasm32` compiled (NET.wasm
// and NET.weights.bin) and run its forward pass, in Node.js or a browser:
//
//     import { loadNetwork } from "./cnnc_loader.mjs";
//     const net = await loadNetwork(wasmBytes, weightsBytes);
//     const y = net.forward(x, batch);   // x: Float32Array of batch * net.inputSize
//     net.free();
//
// The module exports the C API of NET.h (NET_init_from_memory, NET_forward, ...) and its
// own allocator (NET_alloc, NET_release); it imports the C math functions its kernels call
// (expf, logf, tanhf, erff, ...) from "env", which JavaScript's Math gives here (erf, which
// Math lacks, below). Float64 networks (NET_scalar_size 8) take and give Float64Arrays.

// erf in double precision: its Taylor series below 4 (the terms' cancellation costs at most
// 7 of double's 16 digits there), and ±1 beyond, where 1 - erf(4) = 1.5e-8 is below half a
// float32 ulp of 1
function erf(x) {
  const a = Math.abs(x);
  if (a >= 4) return Math.sign(x);
  let term = a;
  let sum = a;
  for (let n = 1; Math.abs(term) > 1e-17 * Math.abs(sum); n++) {
    term *= (-a * a) / n;
    sum += term / (2 * n + 1);
  }
  return (Math.sign(x) * 2 * sum) / Math.sqrt(Math.PI);
}

const MATH = { erf };
for (const name of Object.getOwnPropertyNames(Math)) {
  if (typeof Math[name] === "function") MATH[name] = Math[name];
}

function mathImports(module) {
  const env = {};
  for (const { module: from, name, kind } of WebAssembly.Module.imports(module)) {
    if (from !== "env" || kind !== "function") continue;
    // expf and exp, tanhf and tanh: float32 arguments arrive as numbers, either way
    const fn = MATH[name] ?? (name.endsWith("f") ? MATH[name.slice(0, -1)] : undefined);
    if (typeof fn !== "function") {
      throw new Error(`the module imports ${name}, which this loader cannot give`);
    }
    env[name] = fn;
  }
  return { env };
}

export async function loadNetwork(wasmBytes, weightsBytes) {
  const module = await WebAssembly.compile(wasmBytes);
  const instance = await WebAssembly.instantiate(module, mathImports(module));
  const api = instance.exports;
  const forwardName = Object.keys(api).find((k) => k.endsWith("_forward"));
  if (!forwardName) throw new Error("not a cnnc library module: no NET_forward export");
  const net = forwardName.slice(0, -"_forward".length);
  // wasm32's pointers and size_t are unsigned 32-bit: as JavaScript numbers, >>> 0
  const call = (name, ...args) => api[`${net}_${name}`](...args) >>> 0;
  const memory = () => api.memory.buffer; // views of it lapse when it grows
  const message = (status) => {
    const bytes = new Uint8Array(memory(), call("strerror", status));
    return new TextDecoder().decode(bytes.subarray(0, bytes.indexOf(0)));
  };
  const check = (status, what) => {
    if (status !== 0) throw new Error(`${net}_${what}: ${message(status)}`);
  };
  const allocate = (bytes) => {
    const at = call("alloc", bytes);
    if (!at) throw new Error(`${net}: out of memory (${bytes} bytes)`);
    return at;
  };

  let model = 0;
  const weights = allocate(weightsBytes.byteLength);
  const slot = allocate(4);
  try {
    new Uint8Array(memory(), weights, weightsBytes.byteLength).set(
      new Uint8Array(weightsBytes.buffer ?? weightsBytes, weightsBytes.byteOffset ?? 0,
        weightsBytes.byteLength));
    check(call("init_from_memory", slot, weights, weightsBytes.byteLength), "init_from_memory");
    model = new Uint32Array(memory(), slot, 1)[0];
  } finally {
    call("release", weights);
    call("release", slot);
  }

  const Scalars = call("scalar_size") === 8 ? Float64Array : Float32Array;
  const inputSize = call("input_size");
  const outputSize = call("output_size");
  return {
    name: net,
    inputSize,
    outputSize,
    Scalars,
    forward(x, batch) {
      if (!model) throw new Error(`${net}: the model was freed`);
      if (!Number.isInteger(batch) || batch < 1 || x.length !== batch * inputSize) {
        throw new Error(`${net}: ${x.length} inputs for a batch of ${batch} x ${inputSize}`);
      }
      const work = call("workspace_size", batch);
      if (!work) check(2, "workspace_size");
      const size = Scalars.BYTES_PER_ELEMENT;
      const blocks = [];
      try {
        const xs = allocate(x.length * size);
        blocks.push(xs);
        const ys = allocate(batch * outputSize * size);
        blocks.push(ys);
        blocks.push(allocate(work));
        new Scalars(memory(), xs, x.length).set(x);
        check(call("forward", model, xs, batch, ys, blocks[2]), "forward");
        return new Scalars(memory(), ys, batch * outputSize).slice();
      } finally {
        for (const at of blocks) call("release", at);
      }
    },
    free() {
      if (model) call("free", model);
      model = 0;
    },
  };
}
