"""Build script for pqsk's Cython kernels.

Every extension is listed once in ``EXTENSIONS``.  All of them are compiled
with OpenMP when the compiler can build and link a small OpenMP program
(gcc; clang with libomp; Apple clang with Homebrew's libomp); otherwise, or
with ``PQSK_NO_OPENMP=1`` in the environment, they are built without it and
a message says so (the query kernels then run on one thread; training's
k-means still uses a Python thread pool).  ``CC=clang`` selects the
compiler as usual.  No ``-march=native``: the wheels must run on any
x86-64 (the SIMD kernels carry their own target attributes and are chosen
at run time) or arm64 CPU.

Compiling takes a minute or two; each extension is announced as it starts
and when it is done (``pqsk: [2/6] compiling pqsk._adc ...``).  pip hides
a build's output unless asked: ``pip install -v -e .`` shows it.
"""
import json
import os
import shlex
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


def _no_openmp_requested():
    """PQSK_NO_OPENMP set to anything but "", "0", "false", "no", "off"."""
    return os.environ.get("PQSK_NO_OPENMP", "").strip().lower() not in ("", "0", "false",
                                                                         "no", "off")


def _openmp_flags():
    """Return (compile_args, link_args) for OpenMP, or ([], []) if unsupported.

    A candidate is kept when the compiler (``CC``, else ``cc``) compiles and
    links a program calling ``omp_get_max_threads`` with its flags."""
    if _no_openmp_requested():
        _say("PQSK_NO_OPENMP is set: building without OpenMP (the query kernels "
             "run on one thread)")
        return [], []
    if sys.platform == "win32":
        return ["/openmp"], []
    if sys.platform == "darwin":
        candidates = [(["-Xpreprocessor", "-fopenmp"], ["-lomp"])]
        # Homebrew's libomp (keg-only): Apple silicon, then Intel prefixes.
        for prefix in (os.environ.get("PQSK_LIBOMP_PREFIX"), "/opt/homebrew/opt/libomp",
                       "/usr/local/opt/libomp"):
            if prefix and os.path.isdir(os.path.join(prefix, "include")):
                candidates.append(
                    (["-Xpreprocessor", "-fopenmp", "-I" + os.path.join(prefix, "include")],
                     ["-L" + os.path.join(prefix, "lib"), "-lomp"]))
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
            cmd = [*shlex.split(cc), *cflags, src, "-o", os.path.join(tmp, "t"), *lflags]
            if subprocess.call(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) == 0:
                return cflags, lflags
        except OSError:
            pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    warnings.warn(
        f"pqsk: the C compiler ({cc}) cannot build an OpenMP program (for clang: "
        "install libomp); the kernels are built without OpenMP and the query "
        "kernels will run on a single thread (set PQSK_NO_OPENMP=1 to skip this "
        "check)."
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
        # Kernels built before with another compiler or other flags (e.g.
        # PQSK_NO_OPENMP) would otherwise count as up to date, and a build
        # would mix kernels with and without OpenMP.
        flags = json.dumps({"CC": os.environ.get("CC", "cc"),
                            "CFLAGS": os.environ.get("CFLAGS", ""),
                            "ext": [[e.name, e.extra_compile_args, e.extra_link_args]
                                    for e in self.extensions]}, sort_keys=True)
        stamp = os.path.join(self.build_temp, "pqsk-build-flags.json")
        try:
            with open(stamp) as f:
                before = f.read()
        except OSError:
            before = None
        if before != flags and not self.force:
            if before is not None:
                _say("the compiler or its flags changed since the last build: "
                     "compiling every kernel")
            self.force = True
        _say(f"compiling {len(self.extensions)} Cython kernels (C, -O3"
             + (", OpenMP" if any("openmp" in " ".join(e.extra_compile_args)
                                  for e in self.extensions) else "")
             + "); a few minutes in all on a slow machine")
        super().build_extensions()
        os.makedirs(self.build_temp, exist_ok=True)
        with open(stamp, "w") as f:
            f.write(flags)
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
