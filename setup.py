"""Build of the Cython core. `LEDGER_DEBUG=1 pip install -e .` turns bounds checks and the costly invariants back on."""
import glob
import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("LEDGER_DEBUG", "") not in ("", "0")

compile_args = ["-O0", "-g"] if DEBUG else ["-O3", "-fno-strict-aliasing"]
macros = [("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")]
if DEBUG:
    macros.append(("LEDGER_DEBUG", "1"))

# The C headers are included by the generated C, which Cython does not track: listed here, a header edit recompiles
# (the .pxd and .pxi files Cython follows itself).
headers = sorted(glob.glob("ledger/*.h"))

extensions = [
    Extension(
        "ledger._core",
        ["ledger/_core.pyx"],
        include_dirs=[numpy.get_include(), "ledger"],
        define_macros=macros,
        extra_compile_args=compile_args,
        depends=headers,
    ),
    Extension(
        "ledger._madvise",
        ["ledger/_madvise.pyx"],
        define_macros=macros,
        extra_compile_args=compile_args,
    ),
    Extension(
        "ledger._ring",
        ["ledger/_ring.pyx"],
        include_dirs=[numpy.get_include(), "ledger"],
        define_macros=macros,
        extra_compile_args=compile_args,
        depends=headers,
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": 3,
            "boundscheck": DEBUG,
            "wraparound": False,
            "initializedcheck": DEBUG,
            "cdivision": True,
            "embedsignature": True,
        },
        annotate=False,
    ),
)
