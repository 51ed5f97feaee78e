"""Eigendecomposition of a float32 symmetric matrix that lets other threads run: LAPACK's `ssyevd`, called
through SciPy's Cython LAPACK table by ctypes, which releases the GIL for the call.

Why not `scipy.linalg.eigh`: its f2py wrapper of `?syevd` holds the GIL, so `map_on_cores` ran a run's eight
512-wide `eigh`s one after another (116 ms on two threads as on one); through ctypes the same routine of the same
library gives the same bits and runs them side by side (58 ms). Where the table or its entry cannot be found,
`scipy.linalg.eigh` does the work.
"""

from __future__ import annotations

import ctypes
from functools import cache

import numpy as np
import scipy.linalg

_INT = ctypes.POINTER(ctypes.c_int)
_FLOAT = ctypes.POINTER(ctypes.c_float)


@cache
def _ssyevd():
    """`ssyevd` of SciPy's LAPACK as a ctypes function, or None where SciPy does not export it."""
    try:
        from scipy.linalg import cython_lapack

        capsule = cython_lapack.__pyx_capi__["ssyevd"]
    except (ImportError, AttributeError, KeyError):
        return None
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    name = get_name(capsule)
    if not name.startswith(b"void (char *, char *, int *, "):  # not the LP64 C interface this call is written for
        return None
    address = get_pointer(capsule, name)
    # void ssyevd(char *jobz, char *uplo, int *n, s *a, int *lda, s *w, s *work, int *lwork, int *iwork,
    #             int *liwork, int *info)
    signature = ctypes.CFUNCTYPE(
        None, ctypes.c_char_p, ctypes.c_char_p, _INT, _FLOAT, _INT, _FLOAT, _FLOAT, _INT, _INT, _INT, _INT
    )
    return signature(address)


def symmetric_eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(eigenvalues ascending, eigenvectors as columns)` of a symmetric float32 matrix (its lower triangle is
    read), as `scipy.linalg.eigh(matrix, driver="evd")` gives them, with the GIL released during the LAPACK call."""
    if not np.isfinite(matrix).all():
        raise ValueError("array must not contain infs or NaNs")
    routine = _ssyevd()
    if routine is None:
        return scipy.linalg.eigh(matrix.astype(np.float32), driver="evd", check_finite=False)
    a = np.array(matrix, dtype=np.float32, order="F")  # overwritten by the eigenvectors
    n = a.shape[0]
    w = np.empty(n, dtype=np.float32)
    size, info = ctypes.c_int(n), ctypes.c_int(0)

    def call(work: np.ndarray, lwork: int, iwork: np.ndarray, liwork: int) -> None:
        routine(
            b"V", b"L", ctypes.byref(size), a.ctypes.data_as(_FLOAT), ctypes.byref(size), w.ctypes.data_as(_FLOAT),
            work.ctypes.data_as(_FLOAT), ctypes.byref(ctypes.c_int(lwork)), iwork.ctypes.data_as(_INT),
            ctypes.byref(ctypes.c_int(liwork)), ctypes.byref(info),
        )  # fmt: skip

    work, iwork = np.empty(1, dtype=np.float32), np.empty(1, dtype=np.int32)
    call(work, -1, iwork, -1)  # the workspace query: the sizes come back in work[0] and iwork[0]
    lwork, liwork = int(work[0]), int(iwork[0])
    call(np.empty(lwork, dtype=np.float32), lwork, np.empty(liwork, dtype=np.int32), liwork)
    if info.value != 0:
        raise np.linalg.LinAlgError(f"ssyevd failed (info {info.value})")
    return w, a
