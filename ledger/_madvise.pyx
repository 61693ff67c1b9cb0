# cython: language_level=3
# madvise(2) without the GIL, for ledger.memory (and the journal, through ledger._core.advise). Its own module so
# that memory.py, which the core imports, needs nothing from the core: Python's mmap.madvise holds the GIL, and a
# background thread faulting in a 64 MiB segment with it would stall the writer thread for tens of milliseconds.
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from posix.mman cimport madvise
from libc.errno cimport errno


def advise(buffer, int advice, size_t offset=0, size_t length=0):
    """madvise(2) over bytes [offset, offset + length) of a mapped buffer (length 0: to its end), widened to whole
    pages, without holding the GIL: populating a 64 MiB segment takes tens of milliseconds that a writer thread
    must not spend waiting for a background one (Python's mmap.madvise keeps the GIL)."""
    cdef Py_buffer view
    cdef int result, error = 0
    cdef size_t page = 4096, start, end
    PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE)
    try:
        if offset > <size_t>view.len:
            raise ValueError(f"offset {offset} is past the end of a {view.len}-byte buffer")
        if length == 0 or offset + length > <size_t>view.len:
            length = <size_t>view.len - offset
        if length == 0:
            return
        start = (<size_t>view.buf + offset) & ~(page - 1)
        end = (<size_t>view.buf + offset + length + page - 1) & ~(page - 1)
        with nogil:
            result = madvise(<void *>start, end - start, advice)
            if result != 0:
                error = errno
        if result != 0:
            raise OSError(error, f"madvise({advice}) failed")
    finally:
        PyBuffer_Release(&view)
