#!/bin/sh
# The programs the C library tests run, from Debian's packages, where they are missing:
# cross compilers and qemu's user-mode emulators (aarch64, arm, riscv64 builds), clang, lld
# and llvm-ar (wasm32 builds), Node.js (to run those), make (examples/c). Without root or
# apt-get this says what is missing and goes on: those tests then skip, saying why.
# It never fails the command it is part of.

PACKAGES="qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross gcc-arm-linux-gnueabihf
libc6-dev-armhf-cross gcc-riscv64-linux-gnu libc6-dev-riscv64-cross clang lld llvm nodejs
make gcc"
PROGRAMS="qemu-aarch64 qemu-arm qemu-riscv64 aarch64-linux-gnu-gcc arm-linux-gnueabihf-gcc
riscv64-linux-gnu-gcc clang wasm-ld llvm-ar node make cc"

missing() {
    for program in $PROGRAMS; do
        command -v "$program" >/dev/null 2>&1 || printf '%s ' "$program"
    done
}

absent=$(missing)
if [ -z "$absent" ]; then
    exit 0
fi
echo "install-test-tools: missing $absent; installing them from Debian's packages"
if [ "$(id -u)" = 0 ]; then
    run=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    run="sudo -n"
else
    echo "install-test-tools: not root and no sudo: the tests that need them will skip"
    exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
    # shellcheck disable=SC2086
    timeout 900 $run apt-get update -qq >/dev/null 2>&1
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive timeout 900 $run apt-get install -y -qq $PACKAGES \
        >/dev/null 2>&1 || echo "install-test-tools: apt-get install failed"
else
    echo "install-test-tools: no apt-get here: the tests that need them will skip"
fi
absent=$(missing)
[ -n "$absent" ] && echo "install-test-tools: still missing $absent (those tests skip)"
exit 0
