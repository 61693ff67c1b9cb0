# Included by ledger/_core.pyx (in the order listed there; every name of the module is visible here).
# Scalars from Python: the checked conversions of transfer()'s and create_account()'s arguments.

# ---- Scalars from Python: integers only, in range, or an exception naming the argument ------------------------
# Cython's own conversion to a C integer accepts anything with __int__ (1.5 -> 1, Decimal("3.99") -> 3): for money
# that is a silent change of amount. These accept int (and its subclasses: IntFlag, bool) on a fast path and
# anything with __index__ (numpy integers), and nothing else.

cdef object _ONE = 1    # the defaults of transfer()'s keywords, compared by identity
cdef object _ZERO = 0

cdef object _integer(object value, str name):
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}") from None

cdef uint64_t to_unsigned(object value, str name, uint64_t maximum) except? 0xFFFFFFFFFFFFFFFF:
    if not PyLong_Check(value):
        value = _integer(value, name)
    cdef uint64_t result
    try:
        result = PyLong_AsUnsignedLongLong(value)
    except OverflowError:
        raise ValueError(f"{name} {value} is outside [0, {maximum}]") from None
    if result > maximum:
        raise ValueError(f"{name} {value} is outside [0, {maximum}]")
    return result

cdef int64_t to_signed(object value, str name) except? -1:
    if not PyLong_Check(value):
        value = _integer(value, name)
    try:
        return PyLong_AsLongLong(value)
    except OverflowError:
        raise ValueError(f"{name} {value} is outside the int64 range [{-AMOUNT_MAX - 1}, {AMOUNT_MAX}]") from None
