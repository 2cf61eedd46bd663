"""Build script for pqsk's Cython kernels.

Every extension is listed once in ``EXTENSIONS``.  All of them are compiled
with OpenMP when the compiler supports it; otherwise they are built serial
and a warning is printed (the kernels then run on one thread).  No
``-march=native``: the wheels must run on any x86-64.

Compiling takes a minute or two; each extension is announced as it starts
and when it is done (``pqsk: [2/6] compiling pqsk._adc ...``).  pip hides
a build's output unless asked: ``pip install -v -e .`` shows it.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.modified import newer_group

EXTENSIONS = ["pqsk._encode", "pqsk._adc", "pqsk._ivf", "pqsk._hnsw", "pqsk._openmp",
              "pqsk._fastscan", "pqsk._rerank", "pqsk._aniso"]


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


class BuildExtWithProgress(build_ext):
    """``build_ext`` that says which kernel it compiles, and how long each
    took (extensions may build in parallel threads: ``-j``)."""

    def build_extensions(self):
        self._lock = threading.Lock()
        self._started = 0
        self._t0 = time.perf_counter()
        _say(f"compiling {len(self.extensions)} Cython kernels (C, -O3"
             + (", OpenMP" if any("openmp" in " ".join(e.extra_compile_args)
                                  for e in self.extensions) else "")
             + "); a few minutes in all on a slow machine")
        super().build_extensions()
        _say(f"all kernels built in {time.perf_counter() - self._t0:.0f} s")

    def build_extension(self, ext):
        with self._lock:
            self._started += 1
            i = self._started
        n = len(self.extensions)
        sources = list(ext.sources) + list(ext.depends or [])
        if not (self.force or newer_group(sources, self.get_ext_fullpath(ext.name), "newer")):
            _say(f"[{i}/{n}] {ext.name} is up to date")
            return super().build_extension(ext)
        t0 = time.perf_counter()
        _say(f"[{i}/{n}] compiling {ext.name} ...")
        super().build_extension(ext)
        _say(f"[{i}/{n}] {ext.name} done ({time.perf_counter() - t0:.0f} s)")


_SAY_LOCK = threading.Lock()


def _say(msg):
    with _SAY_LOCK:  # one write per line: parallel builds do not interleave
        sys.stdout.write(f"pqsk: {msg}\n")
        sys.stdout.flush()


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtWithProgress})
