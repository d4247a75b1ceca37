/*
 * uvloop's hooks: TimedCallback (each scheduled callback) and Intercept (the loop's
 * call_soon, call_soon_threadsafe and call_later, which wrap the callback in a
 * TimedCallback, and add_reader and add_writer, in a TimedIO: timed_io.c).
 */
#include "speedups.h"
#include "timed.h"
#include "wrapper.h"

static PyObject *seen_context; /* a "context" keyword name object seen from callers */

PyObject *ls_wrapper_repr(Wrapper *self) {
    if (self->callback == NULL)
        return PyUnicode_FromFormat("<%s (cleared)>", Py_TYPE(self)->tp_name);
    return PyObject_Repr(self->callback);
}

PyObject *ls_wrapper_get_probe(Wrapper *self, void *Py_UNUSED(closure)) {
    if (self->recorder == NULL || self->recorder->probe == NULL)
        Py_RETURN_NONE;
    return Py_NewRef(self->recorder->probe);
}

/* ---------------------------------------------------------------------------------------
 * TimedCallback (uvloop)
 */
typedef struct {
    WRAPPER_HEAD
    double ready;
    vectorcallfunc vectorcall;
} TimedCallback;

LS_GC_FUNCTIONS(TimedCallback, WRAPPER_FIELDS)

/* callback(*args): a callable without vectorcall (asyncio's C task step wrapper) called
 * with no arguments goes straight to its tp_call with the empty tuple, as uvloop's own
 * handles call it, rather than through the generic path that would build the tuple.  No
 * recursion check around it: this call sits at a fixed depth, right under the loop's run
 * (uvloop's Handle._run), and Python code it reaches is checked where the interpreter
 * enters it; from 3.12 on, Py_EnterRecursiveCall and Py_LeaveRecursiveCall are calls into
 * libpython that each read the thread state from thread-local storage. */
static inline PyObject *call_callback(PyObject *callback, PyObject *const *args, size_t nargsf,
                                      PyObject *kwnames) {
    ternaryfunc call = Py_TYPE(callback)->tp_call;
    if (PyVectorcall_NARGS(nargsf) == 0 && kwnames == NULL && call != NULL &&
        PyVectorcall_Function(callback) == NULL) {
        PyObject *result = call(callback, ls_empty_tuple, NULL);
        if (LS_UNLIKELY(result == NULL) && !PyErr_Occurred())
            PyErr_SetString(PyExc_SystemError, "a callback returned NULL without an exception");
        return result;
    }
    return ls_vectorcall(callback, args, nargsf, kwnames);
}

/* The hooks of timed_call() (timed.h) of TimedCallback. */
LS_ALWAYS_INLINE PyObject *call_timed_callback(TimedStep *step) {
    return call_callback(step->callback, step->args, step->nargsf, step->kwnames);
}

LS_ALWAYS_INLINE int record_timed_callback(TimedStep *step, double start, double end) {
    return ls_record(step->recorder, step->callback, step->ready, start, end);
}

/* A C task's step (call_soon'd; uvloop's timers are due in whole milliseconds, later than
 * asked) made ready before the step before it ended starts where that one ended: it sat in
 * uvloop's ready queue, which keeps uvloop from waiting for I/O. */
LS_ALWAYS_INLINE int timed_callback_chains(TimedStep *step, double chain_end) {
    return step->ready <= chain_end &&
           Py_TYPE(((Wrapper *)step->wrapper)->callback) == step->recorder->step_type;
}

/* Timed even when the clock fails (from when it was made ready), recorded even when the
 * callback raised. */
static const TimedCall timed_callback = {
    .is_timed = NULL,
    .clock_fault = CLOCK_FAULT_START_AT_READY,
    .callback = wrapped_callback,
    .call = call_timed_callback,
    .record_raised = 1,
    .record = record_timed_callback,
    .raise_base_faults = 0,
    .may_chain = timed_callback_chains,
};

static PyObject *TimedCallback_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf,
                                          PyObject *kwnames) {
    TimedCallback *self = (TimedCallback *)op;
    TimedStep step = {.wrapper = op, .recorder = self->recorder, .args = args,
                      .nargsf = nargsf, .kwnames = kwnames, .ready = self->ready};
    return timed_call(&step, &timed_callback);
}

/* One TimedCallback is made and dropped per scheduled callback: a few dropped ones are
 * kept for reuse (the GIL guards the list), tracked by the garbage collector with one
 * reference, the list's, and their fields cleared, so taking one back needs neither
 * PyObject_Init nor PyObject_GC_Track, and dropping one no PyObject_GC_UnTrack (from 3.12
 * on these read the thread state from thread-local storage).  Not without a GIL, nor where
 * a reference tracer (3.13's PyRefTracer) or debug reference counts watch objects. */
#if !defined(Py_GIL_DISABLED) && !defined(Py_TRACE_REFS)
#define TC_FREELIST 256
#else
#define TC_FREELIST 0
#endif
#if TC_FREELIST > 0
static TimedCallback *tc_free[TC_FREELIST];
static int tc_free_count;

/* Whether a dropped TimedCallback may be kept (tracked, with the list's reference). */
static inline int tc_may_keep(void) {
#if defined(Py_REF_DEBUG)
    return 0;
#elif PY_VERSION_HEX >= 0x030D0000
    return tc_free_count < TC_FREELIST && PyRefTracer_GetTracer(NULL) == NULL;
#else
    return tc_free_count < TC_FREELIST;
#endif
}
#endif

static TimedCallback *TimedCallback_create(PyObject *callback, Recorder *recorder, double ready) {
    TimedCallback *self;
#if TC_FREELIST > 0
    if (LS_LIKELY(tc_free_count > 0)) {
        self = tc_free[--tc_free_count]; /* tracked, and the list's reference is now ours */
        self->callback = Py_NewRef(callback);
        self->recorder = (Recorder *)Py_NewRef((PyObject *)recorder);
        self->ready = ready;
        return self;
    }
#endif
    self = PyObject_GC_New(TimedCallback, &ls_TimedCallback_Type);
    if (self == NULL)
        return NULL;
    self->callback = Py_NewRef(callback);
    self->recorder = (Recorder *)Py_NewRef((PyObject *)recorder);
    self->ready = ready;
    self->vectorcall = TimedCallback_vectorcall;
    PyObject_GC_Track(self);
    return self;
}

static PyObject *TimedCallback_new(PyTypeObject *Py_UNUSED(type), PyObject *args,
                                   PyObject *kwds) {
    PyObject *callback, *recorder;
    double ready;
    static char *kwlist[] = {"callback", "recorder", "ready", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO!d:TimedCallback", kwlist, &callback,
                                     &ls_Recorder_Type, &recorder, &ready))
        return NULL;
    if (ls_ready_recorder((Recorder *)recorder) < 0)
        return NULL;
    return (PyObject *)TimedCallback_create(callback, (Recorder *)recorder, ready);
}

static void TimedCallback_dealloc(TimedCallback *self) {
#if TC_FREELIST > 0
    if (LS_LIKELY(Py_IS_TYPE(self, &ls_TimedCallback_Type) && tc_may_keep())) {
        /* The list's reference first: clearing the fields can run any code, the collector
         * included, which must not find a tracked object without references. */
        Py_SET_REFCNT(self, 1);
        TimedCallback_clear(self);
        if (tc_free_count < TC_FREELIST) { /* still: the clearing may have kept others */
            tc_free[tc_free_count++] = self;
            return;
        }
        Py_DECREF(self); /* freed below, by this function again (the list is full) */
        return;
    }
#endif
    PyObject_GC_UnTrack(self);
    TimedCallback_clear(self);
    PyObject_GC_Del(self);
}

/* What uvloop (and asyncio's format helpers) read to describe a callback is the callback's:
 * __self__ (a task step is shown as its task), __qualname__ and __name__ (a handle's repr),
 * str() ("Exception in callback ..."); each raises AttributeError exactly when the
 * callback's does.  Read only to describe a handle, never per step. */
static PyObject *TimedCallback_forward(Wrapper *self, void *name) {
    if (self->callback == NULL) {
        PyErr_SetString(PyExc_AttributeError, (const char *)name);
        return NULL;
    }
    return PyObject_GetAttrString(self->callback, (const char *)name);
}

static PyObject *TimedCallback_str(Wrapper *self) {
    if (self->callback == NULL)
        return ls_wrapper_repr(self);
    return PyObject_Str(self->callback);
}

static PyGetSetDef TimedCallback_getset[] = {
    {"probe", (getter)ls_wrapper_get_probe, NULL, NULL, NULL},
    {"__self__", (getter)TimedCallback_forward, NULL, NULL, "__self__"},
    {"__qualname__", (getter)TimedCallback_forward, NULL, NULL, "__qualname__"},
    {"__name__", (getter)TimedCallback_forward, NULL, NULL, "__name__"},
    {NULL}};

static PyMemberDef TimedCallback_members[] = {
    {"callback", T_OBJECT, offsetof(TimedCallback, callback), READONLY, NULL},
    {"ready", T_DOUBLE, offsetof(TimedCallback, ready), READONLY, NULL},
    LS_VECTORCALL_MEMBER(TimedCallback),
    {NULL}};

PyTypeObject ls_TimedCallback_Type = {
    LS_CALLABLE_TYPE(TimedCallback, 0),
    .tp_doc = "TimedCallback(callback, recorder, ready)\n--\n\n"
              "A callback that measures itself (uvloop); repr(), str(), __self__,\n"
              "__qualname__ and __name__ are the callback's.",
    .tp_dealloc = (destructor)TimedCallback_dealloc,
    .tp_repr = (reprfunc)ls_wrapper_repr,
    .tp_str = (reprfunc)TimedCallback_str,
    .tp_getset = TimedCallback_getset,
    .tp_members = TimedCallback_members,
};

/* ---------------------------------------------------------------------------------------
 * Intercept (uvloop's call_soon, call_soon_threadsafe, call_later, and add_reader and
 * add_writer: kind "add_reader", whose callback becomes a TimedIO).  No Python frame of its
 * own: debug mode's "created at" is the caller's line.
 */
enum { KIND_SOON = 0, KIND_LATER = 1, KIND_IO = 2 };

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    int kind;
    Recorder *recorder;
    PyObject *original;  /* the loop's own bound method */
    PyObject *function;  /* what is called: original, or its function when it is a method */
    PyObject *bound;     /* the method's self (the loop) passed first to function, or NULL */
    PyObject *fallback;  /* the pure-Python replacement: used for anything unusual */
    PyObject *loop_time; /* loop.time (call_later only) */
} Intercept;

#define STACK_ARGS 8

/* The loop's own method, called with the arguments given and `wrapped` (a new reference,
 * released here) in place of the callback at cb_index. */
static PyObject *call_original(Intercept *self, PyObject *const *args, Py_ssize_t nargs,
                               PyObject *kwnames, Py_ssize_t cb_index, PyObject *wrapped) {
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    /* stack[0] is free for the callee (PY_VECTORCALL_ARGUMENTS_OFFSET); a bound method is
     * called as its function with the loop first, as asyncio's C task calls the loop's
     * method when nothing shadows it (no method object in between). */
    PyObject *stack[STACK_ARGS + 2];
    PyObject **call = stack + 1;
    Py_ssize_t first = 0;
    if (self->bound != NULL)
        call[first++] = self->bound;
    for (Py_ssize_t i = 0; i < nargs + nkw; i++)
        call[first + i] = args[i];
    call[first + cb_index] = wrapped;
    PyObject *result = ls_vectorcall(
        self->function, call, (size_t)(first + nargs) | PY_VECTORCALL_ARGUMENTS_OFFSET, kwnames);
    Py_DECREF(wrapped);
    return result;
}

/* Whether name, a keyword given, is "context". */
static inline int is_context(PyObject *name) {
    if (name == ls_str.context || name == seen_context)
        return 1;
    if (!PyUnicode_CheckExact(name) || PyUnicode_Compare(name, ls_str.context) != 0)
        return 0;
    Py_INCREF(name);
    Py_XSETREF(seen_context, name);
    return 1;
}

/* call_soon(callback[, arg][, context=ctx]) on a loop method: the calls of asyncio's C task
 * (its next step) and future (a done callback with the future: a task's wakeup), one per
 * task step, so written out on their own. */
static inline PyObject *intercept_soon(Intercept *self, PyObject *const *args,
                                       Py_ssize_t nargs, PyObject *kwnames) {
    PyObject *stack[5]; /* stack[0] is free for the callee (PY_VECTORCALL_ARGUMENTS_OFFSET) */
    double ready;
    if (LS_UNLIKELY(read_clock(self->recorder, &ready) < 0))
        return NULL;
    PyObject *wrapped = (PyObject *)TimedCallback_create(args[0], self->recorder, ready);
    if (LS_UNLIKELY(wrapped == NULL))
        return NULL;
    Py_ssize_t given = nargs + (kwnames != NULL); /* callback, argument, context */
    stack[1] = self->bound;
    stack[2] = wrapped;
    stack[3] = given > 1 ? args[1] : NULL;
    stack[4] = given > 2 ? args[2] : NULL;
    PyObject *result = ls_vectorcall(self->function, stack + 1,
                                     (size_t)(nargs + 1) | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                     kwnames);
    Py_DECREF(wrapped);
    return result;
}

static PyObject *Intercept_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf,
                                      PyObject *kwnames) {
    Intercept *self = (Intercept *)op;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (LS_LIKELY(self->kind == KIND_SOON && (nargs == 1 || nargs == 2) &&
                  self->bound != NULL &&
                  (kwnames == NULL || (PyTuple_GET_SIZE(kwnames) == 1 &&
                                       is_context(PyTuple_GET_ITEM(kwnames, 0))))))
        return intercept_soon(self, args, nargs, kwnames);
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    Py_ssize_t cb_index = self->kind == KIND_SOON ? 0 : 1;
    double ready = 0.0;
    if (nargs <= cb_index || nargs + nkw > STACK_ARGS || nkw > 1)
        goto fallback;
    if (self->kind == KIND_IO) {
        if (nkw != 0)
            goto fallback;
        PyObject *wrapped = ls_timed_io_create(&ls_TimedIO_Type, args[1], self->recorder, NULL);
        if (wrapped == NULL)
            return NULL;
        return call_original(self, args, nargs, kwnames, cb_index, wrapped);
    }
    if (nkw == 1 && !is_context(PyTuple_GET_ITEM(kwnames, 0)))
        goto fallback;
    if (self->kind == KIND_SOON) {
        if (read_clock(self->recorder, &ready) < 0)
            return NULL;
    }
    else {
        PyObject *delay = args[0];
        double d;
        if (PyFloat_CheckExact(delay))
            d = PyFloat_AS_DOUBLE(delay);
        else if (PyLong_CheckExact(delay)) {
            d = PyLong_AsDouble(delay);
            if (d == -1.0 && PyErr_Occurred()) {
                PyErr_Clear();
                goto fallback;
            }
        }
        else
            goto fallback;
        if (d != d) /* NaN: let max() decide, as the pure path does */
            goto fallback;
        PyObject *now = PyObject_CallNoArgs(self->loop_time);
        if (now == NULL)
            return NULL;
        ready = PyFloat_AsDouble(now);
        Py_DECREF(now);
        if (ready == -1.0 && PyErr_Occurred())
            return NULL;
        ready += d > 0.0 ? d : 0.0;
    }
    {
        PyObject *wrapped =
            (PyObject *)TimedCallback_create(args[cb_index], self->recorder, ready);
        if (wrapped == NULL)
            return NULL;
        return call_original(self, args, nargs, kwnames, cb_index, wrapped);
    }
fallback:
    return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
}

static PyObject *Intercept_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"kind", "recorder", "original", "fallback", "loop_time", NULL};
    const char *kind;
    PyObject *recorder, *original, *fallback, *loop_time = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "sO!OO|O:Intercept", kwlist, &kind,
                                     &ls_Recorder_Type, &recorder, &original, &fallback,
                                     &loop_time))
        return NULL;
    int k;
    if (strcmp(kind, "call_soon") == 0)
        k = KIND_SOON;
    else if (strcmp(kind, "call_later") == 0)
        k = KIND_LATER;
    else if (strcmp(kind, "add_reader") == 0)
        k = KIND_IO;
    else {
        PyErr_SetString(PyExc_ValueError,
                        "kind must be 'call_soon', 'call_later' or 'add_reader'");
        return NULL;
    }
    if (k == KIND_LATER && !PyCallable_Check(loop_time)) {
        PyErr_SetString(PyExc_TypeError, "call_later needs loop_time");
        return NULL;
    }
    if (ls_ready_recorder((Recorder *)recorder) < 0)
        return NULL;
    Intercept *self = (Intercept *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = Intercept_vectorcall;
    self->kind = k;
    self->recorder = (Recorder *)Py_NewRef(recorder);
    self->original = Py_NewRef(original);
    if (PyMethod_Check(original)) {
        self->function = Py_NewRef(PyMethod_GET_FUNCTION(original));
        self->bound = Py_NewRef(PyMethod_GET_SELF(original));
    }
    else {
        self->function = Py_NewRef(original);
        self->bound = NULL;
    }
    self->fallback = Py_NewRef(fallback);
    self->loop_time = Py_NewRef(loop_time);
    return (PyObject *)self;
}

#define INTERCEPT_FIELDS(X) \
    X(recorder) X(original) X(function) X(bound) X(fallback) X(loop_time)
LS_GC_FUNCTIONS(Intercept, INTERCEPT_FIELDS)

static PyObject *Intercept_repr(Intercept *self) {
    static const char *kinds[] = {"call_soon", "call_later", "add_reader"};
    return PyUnicode_FromFormat("<loopscope %s of %R>", kinds[self->kind], self->original);
}

static PyMemberDef Intercept_members[] = {
    {"original", T_OBJECT, offsetof(Intercept, original), READONLY, NULL},
    {"fallback", T_OBJECT, offsetof(Intercept, fallback), READONLY, NULL},
    LS_VECTORCALL_MEMBER(Intercept),
    {NULL}};

PyTypeObject ls_Intercept_Type = {
    LS_CALLABLE_TYPE(Intercept, 0),
    .tp_doc = "Intercept(kind, recorder, original, fallback, loop_time=None)\n--\n\n"
              "uvloop's call_soon/call_soon_threadsafe/call_later (wrapping the callback in\n"
              "a TimedCallback) or add_reader/add_writer (kind 'add_reader': in a TimedIO).",
    .tp_dealloc = ls_gc_dealloc,
    .tp_repr = (reprfunc)Intercept_repr,
    .tp_members = Intercept_members,
};
