"""The optional C extension; everything else is in pyproject.toml.

`actdb.store.files._fused_chunks` checks and converts raw HDF5 chunks in one pass (store/files/raw_chunks.py).
It is optional: without a C compiler the install still succeeds and the reader falls back to NumPy and torch.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "actdb.store.files._fused_chunks",
            sources=["store/files/_fused_chunks.c"],
            # int8 values are rounded after the multiply and the add, as NumPy computes them: no fused multiply-add
            extra_compile_args=["-O3", "-ffp-contract=off", "-std=c11"],
            optional=True,
        )
    ]
)
