"""The compiled part of the server: the CPU kernel (focalserve/backends/focal_loss_cpu.cpp), built as a plain
shared library that cpu_kernel.py loads with ctypes; it uses no Python C API. Everything else is in
pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "focalserve.backends._focal_loss_cpu",
    sources=["focalserve/backends/focal_loss_cpu.cpp"],
    language="c++",
    # no -ffast-math: the kernel relies on IEEE semantics (NaN propagation, exact selects); these two only
    # let the compiler vectorise the selects and drop errno, which nothing reads
    extra_compile_args=["-std=c++17", "-O3", "-fno-math-errno", "-fno-trapping-math"],
)])
