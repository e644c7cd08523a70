"""pins.blas(): the BLAS torch was built with, read from the BLAS_INFO build setting and nowhere else."""

from __future__ import annotations

import subprocess
import sys

from reprolora.core import pins

# torch.__config__.show() of torch 2.13.0+cpu from PyPI (x86_64), build settings shortened.
MKL_BUILD = """PyTorch built with:
  - GCC 13.3
  - C++ Version: 202002
  - Intel(R) oneAPI Math Kernel Library Version 2024.2-Product Build 20240605 for Intel(R) 64 architecture applications
  - Intel(R) MKL-DNN v3.12.0 (Git Hash 80afa71049cd69a3df32adcccb623b12cd7baa22)
  - OpenMP 201511 (a.k.a. OpenMP 4.5)
  - LAPACK is enabled (usually provided by MKL)
  - NNPACK is enabled
  - CPU capability usage: AVX512
  - Build settings: BLAS_INFO=mkl, BUILD_TYPE=Release, COMMIT_SHA=cf30153c4c131c8164ee7798e5022d810682e2cb, CUDA_FLAGS= -DLIBCUDACXX_ENABLE_SIMPLIFIED_COMPLEX_OPERATIONS -Xfatbin -compress-all, CXX_COMPILER=/opt/rh/gcc-toolset-13/root/usr/bin/c++, LAPACK_INFO=mkl, PERF_WITH_AVX=1, TORCH_VERSION=2.13.0, USE_CUDA=0, USE_MKL=ON, USE_MKLDNN=ON, USE_OPENMP=ON, 
"""

# torch 2.10.0 from PyPI (aarch64, CPU only), as it prints under qemu; build settings shortened.
OPENBLAS_BUILD = """PyTorch built with:
  - GCC 13.3
  - C++ Version: 201703
  - Intel(R) MKL-DNN v3.7.1 (Git Hash 8d263e693366ef8db40acc569cc7d8edf644556d)
  - OpenMP 201511 (a.k.a. OpenMP 4.5)
  - LAPACK is enabled (usually provided by MKL)
  - NNPACK is enabled
  - CPU capability usage: DEFAULT
  - Build settings: BLAS_INFO=open, BUILD_TYPE=Release, COMMIT_SHA=449b1768410104d3ed79d3bcfe4ba1d65c7f22c0, CXX_COMPILER=/opt/rh/gcc-toolset-13/root/usr/bin/c++, CXX_FLAGS= -ffunction-sections -fdata-sections -DUSE_PTHREADPOOL -DNDEBUG -O2 -fPIC, LAPACK_INFO=open, TORCH_VERSION=2.10.0, USE_CUDA=0, USE_MKLDNN=1, USE_OPENMP=ON, 
"""

# A build that names no BLAS in its settings (e.g. built without one): MKL in the LAPACK line must not count.
UNKNOWN_BUILD = """PyTorch built with:
  - GCC 12.2
  - LAPACK is enabled (usually provided by MKL)
  - CPU capability usage: DEFAULT
  - Build settings: BUILD_TYPE=Release, CXX_FLAGS= -O2 -fPIC, TORCH_VERSION=2.9.0, USE_MKL=OFF, 
"""


def test_mkl_build() -> None:
    assert pins.blas_from_config(MKL_BUILD) == {"name": "mkl", "version": "2024.2-Product Build 20240605"}


def test_openblas_build() -> None:
    # torch's CMake calls it "open"; its version is not in the text (blas() asks the loaded library).
    assert pins.blas_from_config(OPENBLAS_BUILD) == {"name": "openblas", "version": None}


def test_unknown_build() -> None:
    assert pins.blas_from_config(UNKNOWN_BUILD) == {"name": "unknown", "version": None}
    assert pins.blas_from_config("PyTorch built with:\n  - LAPACK is enabled (usually provided by MKL)\n") == {
        "name": "unknown",
        "version": None,
    }


def test_build_settings_are_parsed_as_a_list() -> None:
    settings = pins.build_settings(MKL_BUILD)
    assert settings["BLAS_INFO"] == "mkl" and settings["LAPACK_INFO"] == "mkl" and settings["TORCH_VERSION"] == "2.13.0"
    assert settings["CUDA_FLAGS"] == "-DLIBCUDACXX_ENABLE_SIMPLIFIED_COMPLEX_OPERATIONS -Xfatbin -compress-all"
    # A value that holds ", " stays whole; a key only counts at the start of an item, not inside a value.
    text = "  - Build settings: CXX_FLAGS=-O2, -DBLAS_INFO=fake, BLAS_INFO=open, USE_CUDA=0, \n"
    assert pins.build_settings(text) == {"CXX_FLAGS": "-O2, -DBLAS_INFO=fake", "BLAS_INFO": "open", "USE_CUDA": "0"}
    assert pins.build_settings("PyTorch built with:\n  - BLAS_INFO=mkl is not a build settings line\n") == {}


def test_blas_of_this_torch() -> None:
    """The torch installed here: its own BLAS_INFO, and a version for MKL (from the text) or OpenBLAS (the library)."""
    code = (
        "from reprolora.core import pins; import json, torch; print(json.dumps([pins.blas(), pins.blas_version(), "
        "pins.build_settings(torch.__config__.show())['BLAS_INFO']]))"
    )
    import json

    name, version, blas_info = json.loads(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )
    assert name == {"open": "openblas"}.get(blas_info, blas_info)
    if name in ("mkl", "openblas"):
        assert version and version[0].isdigit()
