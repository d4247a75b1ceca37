/*
 * What uvloop's two wrappers share, TimedCallback (uvloop_hooks.c) and TimedIO
 * (timed_io.c): their first fields, and the functions that only look at those.
 */
#ifndef LOOPSCOPE_WRAPPER_H
#define LOOPSCOPE_WRAPPER_H

#include "speedups.h"
#include "timed.h"

#define WRAPPER_HEAD \
    PyObject_HEAD    \
    PyObject *callback; \
    Recorder *recorder;

typedef struct {
    WRAPPER_HEAD
} Wrapper;

/* Their object fields, for LS_GC_FUNCTIONS */
#define WRAPPER_FIELDS(X) X(callback) X(recorder)

/* repr(): the callback's (uvloop_hooks.c) */
LS_HIDDEN PyObject *ls_wrapper_repr(Wrapper *self);
/* The `probe` attribute: the recorder's probe, or None (uvloop_hooks.c) */
LS_HIDDEN PyObject *ls_wrapper_get_probe(Wrapper *self, void *closure);

/* The hook of timed_call() (timed.h) that both take: the callback is the wrapper's (held
 * for the bookkeeping even if the call drops the wrapper). */
LS_ALWAYS_INLINE PyObject *wrapped_callback(TimedStep *step) {
    return Py_NewRef(((Wrapper *)step->wrapper)->callback);
}

/* A new TimedIO of callback (called on instance, a weak reference, unless NULL); the
 * recorder is ready (timed_io.c). */
LS_HIDDEN PyObject *ls_timed_io_create(PyTypeObject *type, PyObject *callback,
                                       Recorder *recorder, PyObject *instance);

#endif
