#!/bin/sh
# Fail if a runtime closure holds a build tool, Qt or CUDA: the store paths come on stdin, one a line, as
# `nix path-info -r` prints them.
#
#   nix path-info -r ./infer | sh .github/scripts/check-closure.sh
#
# Inference never compiles (no torch.compile) and never symbolizes C++ stack traces, so no C compiler (gcc, its
# wrapper) and no binutils; gcc's runtime library (gcc-<version>-lib: libstdc++, libgomp) is needed and allowed.
# Qt came with gguf's GUI and CUDA with a GPU build of torch: neither belongs to a CPU inference image.
set -eu

# <hash>-<name>: the name's forbidden forms.
forbidden='^/nix/store/[0-9a-z]{32}-((gcc|gcc-wrapper|clang|clang-wrapper|binutils|binutils-wrapper)-[0-9][^/]*|.*(pyside6|qtbase|qtdeclarative|shiboken6).*|.*(cuda|cudnn|cublas|cufft|curand|cusolver|cusparse|nccl|nvrtc).*)$'
allowed='^/nix/store/[0-9a-z]{32}-gcc-[0-9][0-9.]*-(lib|libgcc)$'

found=$(grep -E -- "$forbidden" | grep -Ev -- "$allowed" || true)
if [ -n "$found" ]; then
  printf '%s\n' "$found"
  echo "::error::the closure holds a build tool, Qt or CUDA (listed above)"
  exit 1
fi
echo "no build tool, Qt or CUDA in the closure"
