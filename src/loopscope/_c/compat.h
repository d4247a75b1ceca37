/*
 * What the C accelerator needs across Python 3.10 .. 3.14, and small helpers on CPython's
 * object layout: the exception save / restore, the optional attribute lookup, and the
 * direct reads of a __slots__ entry.
 */
#ifndef LOOPSCOPE_COMPAT_H
#define LOOPSCOPE_COMPAT_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

/* The symbols one file of the module uses from another: not exported from the shared
 * object, so that calls and loads between the files are direct (no PLT or GOT). */
#if defined(__GNUC__) || defined(__clang__)
#define LS_HIDDEN __attribute__((visibility("hidden")))
#else
#define LS_HIDDEN
#endif

/* A function of the per-callback hot path that is always inlined (timed.h's timed_call and
 * its hooks, which are written as functions for clarity only). */
#if defined(__GNUC__) || defined(__clang__)
#define LS_ALWAYS_INLINE static inline __attribute__((always_inline))
#else
#define LS_ALWAYS_INLINE static inline
#endif

/* Branches of the per-callback path that are taken rarely (faults, errors) or almost
 * always: the compiler lays the common path out as straight-line code and moves the rare
 * one aside, so that a step runs through fewer instruction-cache lines. */
#if defined(__GNUC__) || defined(__clang__)
#define LS_LIKELY(x) __builtin_expect(!!(x), 1)
#define LS_UNLIKELY(x) __builtin_expect(!!(x), 0)
#else
#define LS_LIKELY(x) (x)
#define LS_UNLIKELY(x) (x)
#endif

/* A hot function's rare path, kept out of it so that its common path needs no stack frame
 * (a tail call). */
#if defined(__GNUC__) || defined(__clang__)
#define LS_NOINLINE static __attribute__((noinline))
#else
#define LS_NOINLINE static
#endif

/* PyObject_Vectorcall(callable, args, nargsf, kwnames) for the per-step calls: a callable
 * with a vectorcall function is called through it directly.  PyObject_Vectorcall would do
 * the same, but from 3.12 on it first finds the thread state, which a shared libpython
 * reads from thread-local storage through __tls_get_addr, and then checks the result with
 * that thread state; here the result is checked only when it is NULL (the check's one
 * effect: a NULL without an exception becomes a SystemError). */
static inline PyObject *ls_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf,
                                      PyObject *kwnames) {
    vectorcallfunc call = PyVectorcall_Function(callable);
    if (call == NULL)
        return PyObject_Vectorcall(callable, args, nargsf, kwnames);
    PyObject *result = call(callable, args, nargsf, kwnames);
    if (result == NULL && !PyErr_Occurred())
        PyErr_Format(PyExc_SystemError, "%R returned NULL without setting an exception",
                     callable);
    return result;
}

/* ---------------------------------------------------------------------------------------
 * exception save / restore across 3.10 .. 3.14
 */
typedef struct {
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *exc;
#else
    PyObject *type, *value, *tb;
#endif
} saved_exc;

static inline void exc_save(saved_exc *s) {
#if PY_VERSION_HEX >= 0x030C0000
    s->exc = PyErr_GetRaisedException();
#else
    PyErr_Fetch(&s->type, &s->value, &s->tb);
#endif
}

static inline void exc_restore(saved_exc *s) {
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(s->exc);
#else
    PyErr_Restore(s->type, s->value, s->tb);
#endif
}

/* The exception currently set, as one object with its traceback (a new reference, or NULL
 * when none is set); none is left set. */
static inline PyObject *exc_take(void) {
    PyObject *exc;
#if PY_VERSION_HEX >= 0x030C0000
    exc = PyErr_GetRaisedException();
#else
    PyObject *type, *tb;
    PyErr_Fetch(&type, &exc, &tb);
    PyErr_NormalizeException(&type, &exc, &tb);
    if (exc != NULL && tb != NULL)
        PyException_SetTraceback(exc, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
#endif
    return exc;
}

static inline int lookup_optional(PyObject *obj, PyObject *name, PyObject **result) {
#if PY_VERSION_HEX >= 0x030D0000
    return PyObject_GetOptionalAttr(obj, name, result);
#else
    return _PyObject_LookupAttr(obj, name, result);
#endif
}

/* ---------------------------------------------------------------------------------------
 * __slots__ entries read and written directly
 */

/* The offset of a writable object slot (a __slots__ entry) of ``tp``, or -1. */
static inline Py_ssize_t slot_offset(PyTypeObject *tp, PyObject *name) {
    PyObject *descr = _PyType_Lookup(tp, name); /* borrowed */
    if (descr != NULL && Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
        PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
        if (member->type == T_OBJECT_EX && !(member->flags & READONLY))
            return member->offset;
    }
    return -1;
}

/* getattr(obj, name) through a known slot offset when obj's type is exactly ``tp``. */
static inline PyObject *get_slot(PyObject *obj, PyTypeObject *tp, Py_ssize_t offset,
                                 PyObject *name) {
    if (offset >= 0 && Py_TYPE(obj) == tp) {
        PyObject *value = *(PyObject **)((char *)obj + offset);
        if (value != NULL)
            return Py_NewRef(value);
    }
    return PyObject_GetAttr(obj, name);
}

#endif
