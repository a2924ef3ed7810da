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
// (expf, logf, ...) from "env", which JavaScript's Math gives here.

function mathImports(module) {
  const env = {};
  for (const { module: from, name, kind } of WebAssembly.Module.imports(module)) {
    if (from !== "env" || kind !== "function") continue;
    const plain = name.endsWith("f") && name.length > 1 ? name.slice(0, -1) : name;
    const fn = Math[plain];
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
  const call = (name, ...args) => api[`${net}_${name}`](...args);
  const memory = () => api.memory.buffer; // views of it lapse when it grows
  const message = (status) => {
    const at = call("strerror", status);
    const bytes = new Uint8Array(memory(), at);
    return new TextDecoder().decode(bytes.subarray(0, bytes.indexOf(0)));
  };
  const check = (status, what) => {
    if (status !== 0) throw new Error(`${net}_${what}: ${message(status)}`);
  };

  const weights = call("alloc", weightsBytes.byteLength);
  const slot = call("alloc", 4);
  if (!weights || !slot) throw new Error(`${net}: out of memory`);
  new Uint8Array(memory(), weights, weightsBytes.byteLength).set(new Uint8Array(weightsBytes));
  check(call("init_from_memory", slot, weights, weightsBytes.byteLength), "init_from_memory");
  const model = new Uint32Array(memory(), slot, 1)[0];
  call("release", weights);
  call("release", slot);

  const inputSize = Number(call("input_size"));
  const outputSize = Number(call("output_size"));
  return {
    name: net,
    inputSize,
    outputSize,
    forward(x, batch) {
      if (x.length !== batch * inputSize) {
        throw new Error(`${net}: ${x.length} inputs for a batch of ${batch} x ${inputSize}`);
      }
      const work = call("workspace_size", batch);
      if (!work) check(2, "workspace_size");
      const xs = call("alloc", x.length * 4);
      const ys = call("alloc", batch * outputSize * 4);
      const ws = call("alloc", work);
      try {
        if (!xs || !ys || !ws) throw new Error(`${net}: out of memory`);
        new Float32Array(memory(), xs, x.length).set(x);
        check(call("forward", model, xs, batch, ys, ws), "forward");
        return new Float32Array(memory(), ys, batch * outputSize).slice();
      } finally {
        for (const p of [xs, ys, ws]) if (p) call("release", p);
      }
    },
    free() {
      call("free", model);
    },
  };
}
