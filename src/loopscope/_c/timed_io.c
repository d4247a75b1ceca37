/*
 * TimedIO (uvloop): _uvloop_hooks.TimedIO in C, a reader or writer callback or a protocol
 * method that measures itself.  Made once per reader, writer or protocol method, called by
 * libuv's callbacks; it has no schedule delay and is not a task step.  Its first fields
 * are TimedCallback's (wrapper.h).
 *
 * A protocol method is kept as its function and a weak reference to the protocol
 * (`instance`), not as a bound method: the wrapper lives in the protocol's __dict__, and a
 * bound method there would make a reference cycle that keeps the protocol, its transport
 * and buffers alive until the cyclic GC runs.  A call is then function(protocol, *args),
 * with the protocol put in front of the arguments in place when the caller allows it, as
 * CPython calls a bound method.
 */
#include "speedups.h"
#include "timed.h"
#include "wrapper.h"

typedef struct {
    WRAPPER_HEAD
    vectorcallfunc vectorcall;
    PyObject *instance; /* a weak reference to what callback is called on, or NULL */
} TimedIO;

#define TIMED_IO_FIELDS(X) WRAPPER_FIELDS(X) X(instance)
LS_GC_FUNCTIONS(TimedIO, TIMED_IO_FIELDS)

/* The object a weak reference points to, a new reference, or NULL when it is gone. */
static inline PyObject *referent(PyObject *ref) {
#if PY_VERSION_HEX >= 0x030D0000
    PyObject *obj;
    if (PyWeakref_GetRef(ref, &obj) < 0)
        PyErr_Clear(); /* not reached: ref is a weakref.ref (checked in TimedIO_new) */
    return obj;
#else
    PyObject *obj = PyWeakref_GET_OBJECT(ref);
    return obj == Py_None ? NULL : Py_NewRef(obj);
#endif
}

/* One call of a TimedIO: the timed step, and the object the callback is called on. */
typedef struct {
    TimedStep step;
    PyObject *instance; /* borrowed (the vectorcall holds it), or NULL */
} TimedIOStep;

/* Whether this call is measured: not when it runs inside a step that already is (a
 * protocol method called from a timed callback), nor once the probe is no longer active
 * (after uninstall() the protocol keeps its attributes). */
static int io_is_timed(Recorder *r) {
    if (load_start(r) != 0.0)
        return 0;
    PyObject *active = PyObject_GetAttr(r->probe, ls_str.active);
    int timed = active == NULL ? -1 : PyObject_IsTrue(active);
    Py_XDECREF(active);
    if (timed < 0) {
        ls_report_fault(r);
        return 0;
    }
    return timed;
}

#define IO_SMALL_STACK 8

/* callback(instance, *args), as CPython's method_vectorcall calls a bound method. */
static PyObject *call_with_instance(PyObject *callback, PyObject *instance,
                                    PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargsf & PY_VECTORCALL_ARGUMENTS_OFFSET) {
        /* args[-1] is ours to use during the call */
        PyObject **call = (PyObject **)args - 1;
        PyObject *saved = call[0];
        call[0] = instance;
        PyObject *result = ls_vectorcall(callback, call, (size_t)(nargs + 1), kwnames);
        call[0] = saved;
        return result;
    }
    Py_ssize_t total = nargs + (kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames));
    PyObject *small[IO_SMALL_STACK + 1];
    PyObject **stack = small;
    if (total > IO_SMALL_STACK) {
        stack = PyMem_Malloc((size_t)(total + 2) * sizeof(PyObject *));
        if (stack == NULL)
            return PyErr_NoMemory();
    }
    /* stack[0] stays free for the callee (PY_VECTORCALL_ARGUMENTS_OFFSET) */
    stack[1] = instance;
    if (total > 0)
        memcpy(stack + 2, args, (size_t)total * sizeof(PyObject *));
    PyObject *result = ls_vectorcall(
        callback, stack + 1, (size_t)(nargs + 1) | PY_VECTORCALL_ARGUMENTS_OFFSET, kwnames);
    if (stack != small)
        PyMem_Free(stack);
    return result;
}

LS_ALWAYS_INLINE PyObject *call_timed_io(TimedStep *step) {
    PyObject *instance = ((TimedIOStep *)step)->instance;
    if (instance != NULL)
        return call_with_instance(step->callback, instance, step->args, step->nargsf,
                                  step->kwnames);
    return ls_vectorcall(step->callback, step->args, step->nargsf, step->kwnames);
}

LS_ALWAYS_INLINE int record_timed_io(TimedStep *step, double start, double end) {
    return ls_record_io(step->recorder, step->callback, start, end);
}

/* Only when io_is_timed(), called untimed when the clock fails, recorded even when the
 * callback raised (with record_io: no schedule delay, not a task step). */
static const TimedCall timed_io = {
    .is_timed = io_is_timed,
    .clock_fault = CLOCK_FAULT_UNTIMED,
    .callback = wrapped_callback,
    .call = call_timed_io,
    .record_raised = 1,
    .record = record_timed_io,
    .raise_base_faults = 0,
};

static PyObject *TimedIO_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf,
                                    PyObject *kwnames) {
    TimedIO *self = (TimedIO *)op;
    TimedIOStep call = {.step = {.wrapper = op, .recorder = self->recorder, .args = args,
                                 .nargsf = nargsf, .kwnames = kwnames}};
    if (self->instance == NULL)
        return timed_call(&call.step, &timed_io);
    /* The protocol is alive while uvloop calls its methods (the transport holds it).  Only
     * a caller that kept the method after dropping the protocol can find it gone: there is
     * nothing left to call the method on, so the call does nothing, untimed. */
    call.instance = referent(self->instance);
    if (call.instance == NULL)
        Py_RETURN_NONE;
    PyObject *result = timed_call(&call.step, &timed_io);
    Py_DECREF(call.instance);
    return result;
}

PyObject *ls_timed_io_create(PyTypeObject *type, PyObject *callback, Recorder *recorder,
                             PyObject *instance) {
    TimedIO *self = (TimedIO *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->callback = Py_NewRef(callback);
    self->recorder = (Recorder *)Py_NewRef(recorder);
    self->vectorcall = TimedIO_vectorcall;
    self->instance = Py_XNewRef(instance);
    return (PyObject *)self;
}

static PyObject *TimedIO_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *callback, *recorder, *instance = Py_None;
    static char *kwlist[] = {"callback", "recorder", "instance", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO!|O:TimedIO", kwlist, &callback,
                                     &ls_Recorder_Type, &recorder, &instance))
        return NULL;
    if (instance != Py_None && !PyWeakref_CheckRef(instance)) {
        PyErr_SetString(PyExc_TypeError, "TimedIO() argument 'instance' must be a weak reference");
        return NULL;
    }
    if (ls_ready_recorder((Recorder *)recorder) < 0)
        return NULL;
    return ls_timed_io_create(type, callback, (Recorder *)recorder,
                              instance == Py_None ? NULL : instance);
}

/* The method it times: callback itself, or callback bound to the instance (None once the
 * instance is gone). */
static PyObject *TimedIO_get_callback(TimedIO *self, void *Py_UNUSED(closure)) {
    if (self->callback == NULL)
        Py_RETURN_NONE;
    if (self->instance == NULL)
        return Py_NewRef(self->callback);
    PyObject *instance = referent(self->instance);
    if (instance == NULL)
        Py_RETURN_NONE;
    PyObject *method = PyMethod_New(self->callback, instance);
    Py_DECREF(instance);
    return method;
}

/* The repr of the method it times, as uvloop's messages name it. */
static PyObject *TimedIO_repr(TimedIO *self) {
    if (self->callback == NULL || self->instance == NULL)
        return ls_wrapper_repr((Wrapper *)self);
    PyObject *method = TimedIO_get_callback(self, NULL);
    if (method == NULL)
        return NULL;
    if (method == Py_None) {
        Py_DECREF(method);
        return PyUnicode_FromFormat("<%s of %R, its instance gone>", Py_TYPE(self)->tp_name,
                                    self->callback);
    }
    PyObject *repr = PyObject_Repr(method);
    Py_DECREF(method);
    return repr;
}

/* What uvloop reads to describe a reader's or writer's handle is the method's, as for
 * TimedCallback: __self__, __qualname__, __name__ and str(); AttributeError exactly when
 * the method's raises it (and once its instance is gone). */
static PyObject *TimedIO_forward(TimedIO *self, void *name) {
    PyObject *method = TimedIO_get_callback(self, NULL);
    if (method == NULL)
        return NULL;
    PyObject *value = method == Py_None ? NULL : PyObject_GetAttrString(method, (const char *)name);
    if (method == Py_None)
        PyErr_SetString(PyExc_AttributeError, (const char *)name);
    Py_DECREF(method);
    return value;
}

static PyObject *TimedIO_str(TimedIO *self) {
    PyObject *method = TimedIO_get_callback(self, NULL);
    if (method == NULL)
        return NULL;
    PyObject *text = method == Py_None ? TimedIO_repr(self) : PyObject_Str(method);
    Py_DECREF(method);
    return text;
}

static PyGetSetDef TimedIO_getset[] = {
    {"probe", (getter)ls_wrapper_get_probe, NULL, NULL, NULL},
    {"callback", (getter)TimedIO_get_callback, NULL, NULL, NULL},
    {"__self__", (getter)TimedIO_forward, NULL, NULL, "__self__"},
    {"__qualname__", (getter)TimedIO_forward, NULL, NULL, "__qualname__"},
    {"__name__", (getter)TimedIO_forward, NULL, NULL, "__name__"},
    {NULL}};

static PyMemberDef TimedIO_members[] = {
    LS_VECTORCALL_MEMBER(TimedIO),
    {NULL}};

PyTypeObject ls_TimedIO_Type = {
    LS_CALLABLE_TYPE(TimedIO, 0),
    .tp_doc = "TimedIO(callback, recorder, instance=None)\n--\n\n"
              "An I/O callback that measures itself (uvloop); repr() is the callback's.\n"
              "With instance, a weak reference, it calls callback(instance(), *args).",
    .tp_dealloc = ls_gc_dealloc,
    .tp_repr = (reprfunc)TimedIO_repr,
    .tp_str = (reprfunc)TimedIO_str,
    .tp_getset = TimedIO_getset,
    .tp_members = TimedIO_members,
};
