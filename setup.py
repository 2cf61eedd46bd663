"""Build script for pqsk's Cython kernels.

Every extension is listed once in ``EXTENSIONS``.  All of them are compiled
with OpenMP when the compiler supports it; otherwise they are built serial
and a warning is printed (the kernels then run on one thread).  No
``-march=native``: the wheels must run on any x86-64.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

EXTENSIONS = ["pqsk._encode", "pqsk._adc", "pqsk._ivf", "pqsk._hnsw", "pqsk._openmp",
              "pqsk._fastscan", "pqsk._rerank"]


def _openmp_flags():
    """Return (compile_args, link_args) for OpenMP, or ([], []) if unsupported."""
    if os.environ.get("PQSK_NO_OPENMP"):
        return [], []
    if sys.platform == "win32":
        return ["/openmp"], []
    if sys.platform == "darwin":
        candidates = [(["-Xpreprocessor", "-fopenmp"], ["-lomp"])]
    else:
        candidates = [(["-fopenmp"], ["-fopenmp"])]
    cc = os.environ.get("CC", "cc")
    test = "#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n"
    for cflags, lflags in candidates:
        tmp = tempfile.mkdtemp()
        try:
            src = os.path.join(tmp, "t.c")
            with open(src, "w") as f:
                f.write(test)
            cmd = [cc, *cflags, src, "-o", os.path.join(tmp, "t"), *lflags]
            if subprocess.call(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) == 0:
                return cflags, lflags
        except OSError:
            pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    warnings.warn(
        "pqsk: the C compiler does not support OpenMP; the kernels are built "
        "without it and will run on a single thread."
    )
    return [], []


def extensions():
    omp_c, omp_l = _openmp_flags()
    opt = ["/O2"] if sys.platform == "win32" else ["-O3"]
    exts = [
        Extension(
            name,
            [name.replace(".", "/") + ".pyx"],
            include_dirs=[np.get_include()],
            extra_compile_args=opt + omp_c,
            extra_link_args=omp_l,
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        )
        for name in EXTENSIONS
    ]
    return cythonize(
        exts,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )


setup(ext_modules=extensions())
