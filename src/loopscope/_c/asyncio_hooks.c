/*
 * asyncio's hooks: CallSoon (the loop's _call_soon instance attribute, which makes handles
 * of the per-loop Handle subclass and notes when they were made ready), TimedRun (the
 * _run method of the per-loop Handle and TimerHandle subclasses) and TimedPoller (stands in
 * for the kernel's poller inside the loop's selector and counts the time waited in it).
 */
#include "speedups.h"
#include "timed.h"

/* ---------------------------------------------------------------------------------------
 * CallSoon (asyncio's loop._call_soon)
 */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    Recorder *recorder;
    PyObject *handle_class;
    PyObject *loop;
    PyObject *append;     /* loop._ready.append */
    PyObject *ready_attr; /* "_loopscope_ready" */
    PyObject *fallback;
    Py_ssize_t ready_offset; /* slot of handle_class, or -1 */
    Py_ssize_t trace_offset; /* its _source_traceback slot, or -1 */
    Py_ssize_t stack_depth;  /* asyncio.constants.DEBUG_STACK_DEPTH */
} CallSoon;

static PyObject *CallSoon_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf,
                                     PyObject *kwnames) {
    CallSoon *self = (CallSoon *)op;
    if (PyVectorcall_NARGS(nargsf) != 3 || kwnames != NULL)
        return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
    /* handle = handle_class(callback, args, loop, context) */
    PyObject *stack[5] = {NULL, args[0], args[1], self->loop, args[2]};
    PyObject *handle =
        PyObject_Vectorcall(self->handle_class, stack + 1, 4 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                            NULL);
    if (handle == NULL)
        return NULL;
    double now;
    if (read_clock(self->recorder, &now) < 0)
        goto error;
    PyObject *value = PyFloat_FromDouble(now);
    if (value == NULL)
        goto error;
    PyTypeObject *tp = (PyTypeObject *)self->handle_class;
    if (self->ready_offset >= 0 && Py_TYPE(handle) == tp) {
        Py_XSETREF(*(PyObject **)((char *)handle + self->ready_offset), value);
    }
    else {
        int rc = PyObject_SetAttr(handle, self->ready_attr, value);
        Py_DECREF(value);
        if (rc < 0)
            goto error;
    }
    /* Debug mode: asyncio's own _call_soon is a frame, which takes one of the frames that
     * the handle's source traceback keeps and removes itself from it; this one has none.
     * When the stack was cut, the oldest frame is what asyncio's would not have kept. */
    if (self->trace_offset >= 0 && Py_TYPE(handle) == tp) {
        PyObject *trace = *(PyObject **)((char *)handle + self->trace_offset);
        if (trace != NULL && PyList_Check(trace) &&
            PyList_GET_SIZE(trace) >= self->stack_depth &&
            PyList_SetSlice(trace, 0, 1, NULL) < 0)
            PyErr_Clear(); /* the stack stays as it is: nothing of this reaches the caller */
    }
    PyObject *res = PyObject_CallOneArg(self->append, handle);
    if (res == NULL)
        goto error;
    Py_DECREF(res);
    return handle;
error:
    Py_DECREF(handle);
    return NULL;
}

/* How many frames asyncio's debug mode keeps of a stack (asyncio.constants), or -1. */
static Py_ssize_t debug_stack_depth(void) {
    PyObject *constants = PyImport_ImportModule("asyncio.constants");
    if (constants == NULL)
        return -1;
    PyObject *depth = PyObject_GetAttrString(constants, "DEBUG_STACK_DEPTH");
    Py_DECREF(constants);
    if (depth == NULL)
        return -1;
    Py_ssize_t value = PyNumber_AsSsize_t(depth, PyExc_OverflowError);
    Py_DECREF(depth);
    return value == -1 && PyErr_Occurred() ? -1 : value;
}

static PyObject *CallSoon_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"recorder", "handle_class", "loop", "append", "ready_attr",
                             "fallback", NULL};
    PyObject *recorder, *handle_class, *loop, *append, *ready_attr, *fallback;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!OOOUO:CallSoon", kwlist, &ls_Recorder_Type,
                                     &recorder, &handle_class, &loop, &append, &ready_attr,
                                     &fallback))
        return NULL;
    if (ls_ready_recorder((Recorder *)recorder) < 0)
        return NULL;
    CallSoon *self = (CallSoon *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = CallSoon_vectorcall;
    self->recorder = (Recorder *)Py_NewRef(recorder);
    self->handle_class = Py_NewRef(handle_class);
    self->loop = Py_NewRef(loop);
    self->append = Py_NewRef(append);
    Py_INCREF(ready_attr);
    PyUnicode_InternInPlace(&ready_attr);
    self->ready_attr = ready_attr;
    self->fallback = Py_NewRef(fallback);
    self->ready_offset = self->trace_offset = -1;
    if (PyType_Check(handle_class)) {
        self->ready_offset = slot_offset((PyTypeObject *)handle_class, ready_attr);
        self->trace_offset = slot_offset((PyTypeObject *)handle_class, ls_str.source_traceback);
    }
    self->stack_depth = debug_stack_depth();
    if (self->stack_depth < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

#define CALLSOON_FIELDS(X) \
    X(recorder) X(handle_class) X(loop) X(append) X(ready_attr) X(fallback)
LS_GC_FUNCTIONS(CallSoon, CALLSOON_FIELDS)

static PyMemberDef CallSoon_members[] = {
    {"fallback", T_OBJECT, offsetof(CallSoon, fallback), READONLY, NULL},
    LS_VECTORCALL_MEMBER(CallSoon),
    {NULL}};

PyTypeObject ls_CallSoon_Type = {
    LS_CALLABLE_TYPE(CallSoon, 0),
    .tp_doc = "CallSoon(recorder, handle_class, loop, append, ready_attr, fallback)\n--\n\n"
              "asyncio's loop._call_soon, making timed handles.",
    .tp_dealloc = ls_gc_dealloc,
    .tp_members = CallSoon_members,
};

/* ---------------------------------------------------------------------------------------
 * Reraise: a handle's context for one call of asyncio's own Handle._run, after the hot path
 * ran the handle's callback and it raised.  Its run() puts the real context back and
 * raises the callback's exception from C, with its traceback as it was: the exception then
 * leaves asyncio's Handle._run with the traceback it has without loopscope (no frame of
 * loopscope's), and Handle._run builds this Python version's message and context for the
 * loop's exception handler.
 */
typedef struct {
    PyObject_HEAD
    PyObject *handle;
    PyObject *context; /* the handle's own context */
    PyObject *exc;     /* the callback's exception, with its traceback */
} Reraise;

#define RERAISE_FIELDS(X) X(handle) X(context) X(exc)
LS_GC_FUNCTIONS(Reraise, RERAISE_FIELDS)

static PyObject *Reraise_run(Reraise *self, PyObject *const *Py_UNUSED(args),
                             Py_ssize_t Py_UNUSED(nargs), PyObject *Py_UNUSED(kwnames)) {
    PyObject *exc = self->exc, *handle = self->handle;
    if (exc == NULL || handle == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "loopscope: Reraise.run called twice");
        return NULL;
    }
    self->exc = self->handle = NULL;
    /* the exception handler may read the handle's context (3.12+ runs it there) */
    int rc = PyObject_SetAttr(handle, ls_str.context_slot, self->context);
    Py_DECREF(handle);
    if (rc < 0) {
        Py_DECREF(exc);
        return NULL;
    }
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(exc);
#else
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(exc)), exc, PyException_GetTraceback(exc));
#endif
    return NULL;
}

static PyMethodDef Reraise_methods[] = {
    {"run", (PyCFunction)(void (*)(void))Reraise_run, METH_FASTCALL | METH_KEYWORDS, NULL},
    {NULL}};

PyTypeObject ls_Reraise_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "loopscope._speedups.Reraise",
    .tp_basicsize = sizeof(Reraise),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A handle's context for one call of asyncio's Handle._run (internal).",
    .tp_dealloc = ls_gc_dealloc,
    .tp_traverse = (traverseproc)Reraise_traverse,
    .tp_clear = (inquiry)Reraise_clear,
    .tp_methods = Reraise_methods,
};

/* ---------------------------------------------------------------------------------------
 * TimedRun (asyncio: Handle._run of the per-loop subclasses), a method descriptor
 */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    Recorder *recorder;
    PyObject *handle_run; /* asyncio.events.Handle._run */
    PyObject *ready_attr; /* "_loopscope_ready" or "_when" (NULL for I/O handles) */
    PyTypeObject *cls;    /* the handle class it is the _run of (slots read directly) */
    Py_ssize_t callback_offset, ready_offset, context_offset, args_offset, trace_offset;
} TimedRun;

#define RUN_STACK 8

/* asyncio's own Handle._run, with the callback's exception ``exc`` (a reference this
 * steals) raised in place of the call (see Reraise). */
static PyObject *replay(TimedRun *self, PyObject *handle, PyObject *context, PyObject *exc) {
    Reraise *stand_in = PyObject_GC_New(Reraise, &ls_Reraise_Type);
    if (stand_in == NULL) {
        Py_DECREF(exc);
        return NULL;
    }
    stand_in->handle = Py_NewRef(handle);
    stand_in->context = Py_NewRef(context);
    stand_in->exc = exc;
    PyObject_GC_Track(stand_in);
    PyObject **slot = (PyObject **)((char *)handle + self->context_offset);
    Py_XSETREF(*slot, Py_NewRef((PyObject *)stand_in));
    PyObject *result = PyObject_Vectorcall(self->handle_run, &handle, 1, NULL);
    if (*slot == (PyObject *)stand_in) /* run() was not called: put the context back */
        Py_XSETREF(*slot, Py_NewRef(context));
    Py_DECREF(stand_in);
    return result;
}

/* context.run(callback, *args), the context first in args: Context.run, a method of a type
 * that cannot be subclassed, is looked up once and called as its function, rather than
 * looked up by name on every step (PyObject_VectorcallMethod). */
static PyObject *context_run_method; /* contextvars.Context.run, kept for the process */

static PyObject *context_run(PyObject *const *args, size_t nargsf) {
    if (!PyContext_CheckExact(args[0]))
        return PyObject_VectorcallMethod(ls_str.run, args, nargsf, NULL);
    if (context_run_method == NULL) {
        context_run_method = PyObject_GetAttr((PyObject *)&PyContext_Type, ls_str.run);
        if (context_run_method == NULL)
            return NULL;
    }
    return ls_vectorcall(context_run_method, args, nargsf, NULL);
}

/* events.Handle._run: self._context.run(self._callback, *self._args).  An exception other
 * than SystemExit/KeyboardInterrupt is replayed through asyncio's own Handle._run, so the
 * loop's exception handler gets what it always gets.  A handle made in debug mode (it has
 * a source traceback) is run by asyncio's Handle._run itself: what the callback sees of
 * the stack (a future's or a handle's source traceback made there) is then the stack it
 * has without loopscope, Handle._run's frame included. */
static PyObject *run_handle(TimedRun *self, PyObject *handle) {
    if (Py_TYPE(handle) != self->cls || self->context_offset < 0 || self->args_offset < 0 ||
        self->callback_offset < 0 || self->trace_offset < 0)
        return PyObject_Vectorcall(self->handle_run, &handle, 1, NULL);
    PyObject *context = *(PyObject **)((char *)handle + self->context_offset);
    PyObject *callback = *(PyObject **)((char *)handle + self->callback_offset);
    PyObject *cargs = *(PyObject **)((char *)handle + self->args_offset);
    PyObject *trace = *(PyObject **)((char *)handle + self->trace_offset);
    if (context == NULL || callback == NULL || cargs == NULL || !PyTuple_CheckExact(cargs) ||
        PyTuple_GET_SIZE(cargs) > RUN_STACK - 3 || (trace != NULL && trace != Py_None))
        return PyObject_Vectorcall(self->handle_run, &handle, 1, NULL);
    Py_ssize_t n = PyTuple_GET_SIZE(cargs);
    PyObject *stack[RUN_STACK];
    /* the callback may cancel its own handle, which clears these slots: hold them */
    Py_INCREF(context);
    Py_INCREF(callback);
    Py_INCREF(cargs);
    stack[1] = context;
    stack[2] = callback;
    for (Py_ssize_t i = 0; i < n; i++)
        stack[3 + i] = PyTuple_GET_ITEM(cargs, i);
    PyObject *result = context_run(stack + 1, (size_t)(2 + n) | PY_VECTORCALL_ARGUMENTS_OFFSET);
    Py_DECREF(callback);
    Py_DECREF(cargs);
    if (result != NULL) {
        Py_DECREF(context);
        Py_DECREF(result);
        Py_RETURN_NONE;
    }
    if (PyErr_ExceptionMatches(PyExc_SystemExit) ||
        PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)) {
        Py_DECREF(context);
        return NULL;
    }
    PyObject *exc = exc_take();
    if (exc == NULL) {
        Py_DECREF(context);
        return NULL;
    }
    result = replay(self, handle, context, exc);
    Py_DECREF(context);
    return result;
}

/* The hooks of timed_call() (timed.h) for TimedRun: the callback and the ready time are
 * the handle's (step->args[0]).  The callback is read once, before the call: one that
 * cancels its own handle clears the handle's _callback, and is still recorded as itself. */
LS_ALWAYS_INLINE PyObject *handle_callback(TimedStep *step) {
    TimedRun *self = (TimedRun *)step->wrapper;
    return get_slot(step->args[0], self->cls, self->callback_offset, ls_str.callback);
}

LS_ALWAYS_INLINE PyObject *call_run_handle(TimedStep *step) {
    return run_handle((TimedRun *)step->wrapper, step->args[0]);
}

LS_ALWAYS_INLINE int record_run(TimedStep *step, double start, double end) {
    TimedRun *self = (TimedRun *)step->wrapper;
    if (self->ready_attr == NULL)
        return ls_record_io(step->recorder, step->callback, start, end);
    PyObject *ready_obj = get_slot(step->args[0], self->cls, self->ready_offset,
                                   self->ready_attr);
    if (ready_obj == NULL)
        return -1;
    double ready = PyFloat_AsDouble(ready_obj);
    Py_DECREF(ready_obj);
    if (ready == -1.0 && PyErr_Occurred())
        return -1;
    return ls_record(step->recorder, step->callback, ready, start, end);
}

/* The clock's error is raised; nothing is recorded when the call raised (SystemExit or
 * KeyboardInterrupt: the pure path stops there too); try: probe.after_step(...) except
 * Exception as exc: probe.fault(exc), so a BaseException of the bookkeeping is raised. */
static const TimedCall timed_run = {
    .is_timed = NULL,
    .clock_fault = CLOCK_FAULT_RAISES,
    .callback = handle_callback,
    .call = call_run_handle,
    .record_raised = 0,
    .record = record_run,
    .raise_base_faults = 1,
};

static PyObject *TimedRun_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf,
                                     PyObject *kwnames) {
    TimedRun *self = (TimedRun *)op;
    if (PyVectorcall_NARGS(nargsf) != 1 || kwnames != NULL)
        return PyObject_Vectorcall(self->handle_run, args, nargsf, kwnames);
    TimedStep step = {.wrapper = op, .recorder = self->recorder, .args = args,
                      .nargsf = nargsf, .kwnames = kwnames};
    return timed_call(&step, &timed_run);
}

static PyObject *TimedRun_descr_get(PyObject *self, PyObject *obj,
                                    PyObject *Py_UNUSED(type)) {
    if (obj == NULL || obj == Py_None)
        return Py_NewRef(self);
    return PyMethod_New(self, obj);
}

static PyObject *TimedRun_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"recorder", "handle_run", "ready_attr", "cls", NULL};
    PyObject *recorder, *handle_run, *ready_attr, *cls = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!OO|O:TimedRun", kwlist, &ls_Recorder_Type,
                                     &recorder, &handle_run, &ready_attr, &cls))
        return NULL;
    if (cls != Py_None && !PyType_Check(cls)) {
        PyErr_SetString(PyExc_TypeError, "cls must be a type or None");
        return NULL;
    }
    if (ready_attr != Py_None && !PyUnicode_Check(ready_attr)) {
        PyErr_SetString(PyExc_TypeError, "ready_attr must be a str, or None for I/O handles");
        return NULL;
    }
    if (ls_ready_recorder((Recorder *)recorder) < 0)
        return NULL;
    TimedRun *self = (TimedRun *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = TimedRun_vectorcall;
    self->recorder = (Recorder *)Py_NewRef(recorder);
    self->handle_run = Py_NewRef(handle_run);
    if (ready_attr != Py_None) {
        Py_INCREF(ready_attr);
        PyUnicode_InternInPlace(&ready_attr);
        self->ready_attr = ready_attr;
    }
    self->callback_offset = self->ready_offset = self->context_offset = self->args_offset = -1;
    self->trace_offset = -1;
    if (cls != Py_None) {
        self->cls = (PyTypeObject *)Py_NewRef(cls);
        self->callback_offset = slot_offset(self->cls, ls_str.callback);
        self->context_offset = slot_offset(self->cls, ls_str.context_slot);
        self->args_offset = slot_offset(self->cls, ls_str.args);
        self->trace_offset = slot_offset(self->cls, ls_str.source_traceback);
        if (self->ready_attr != NULL)
            self->ready_offset = slot_offset(self->cls, self->ready_attr);
    }
    return (PyObject *)self;
}

#define TIMEDRUN_FIELDS(X) X(recorder) X(handle_run) X(ready_attr) X(cls)
LS_GC_FUNCTIONS(TimedRun, TIMEDRUN_FIELDS)

static PyMemberDef TimedRun_members[] = {
    LS_VECTORCALL_MEMBER(TimedRun),
    {NULL}};

PyTypeObject ls_TimedRun_Type = {
    LS_CALLABLE_TYPE(TimedRun, Py_TPFLAGS_METHOD_DESCRIPTOR),
    .tp_doc = "TimedRun(recorder, handle_run, ready_attr, cls=None)\n--\n\n"
              "Handle._run that times the handle (asyncio's loop).",
    .tp_dealloc = ls_gc_dealloc,
    .tp_descr_get = TimedRun_descr_get,
    .tp_members = TimedRun_members,
};

/* ---------------------------------------------------------------------------------------
 * TimedPoller (asyncio: the `_selector` of the loop's selectors.EpollSelector and kin)
 */
typedef struct {
    PyObject_HEAD
    Recorder *recorder;
    PyObject *poller; /* select.epoll, select.poll, select.devpoll or select.kqueue */
    double waited;    /* seconds spent in the timed waits, on the recorder's clock */
    char has_poll, has_control; /* whether the poller has them (epoll has no control) */
} TimedPoller;

#define WAIT_STACK 8

/* poller.<name>(*args, **kwargs), without a bound-method object for the usual few
 * arguments. */
static PyObject *call_poller(TimedPoller *self, PyObject *name, PyObject *const *args,
                             Py_ssize_t nargs, PyObject *kwnames) {
    Py_ssize_t total = nargs + (kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames));
    if (total < WAIT_STACK) {
        PyObject *stack[WAIT_STACK];
        stack[0] = self->poller;
        for (Py_ssize_t i = 0; i < total; i++)
            stack[1 + i] = args[i];
        return PyObject_VectorcallMethod(name, stack, (size_t)(nargs + 1), kwnames);
    }
    PyObject *method = PyObject_GetAttr(self->poller, name);
    if (method == NULL)
        return NULL;
    PyObject *result = PyObject_Vectorcall(method, args, (size_t)nargs, kwnames);
    Py_DECREF(method);
    return result;
}

/* poller.<name>(*args, **kwargs), with the time it takes added to `waited`.  A clock that
 * cannot be read is a fault of loopscope's, handed to the probe: the call itself goes on
 * untimed, and what it returns or raises is the caller's, unchanged. */
static PyObject *timed_wait(TimedPoller *self, PyObject *name, PyObject *const *args,
                            Py_ssize_t nargs, PyObject *kwnames) {
    double start, end;
    int timed = read_clock(self->recorder, &start) == 0;
    if (!timed)
        ls_report_fault(self->recorder);
    PyObject *result = call_poller(self, name, args, nargs, kwnames);
    if (result == NULL || !timed)
        return result; /* an error of the wait: the loop's to handle, as without loopscope */
    if (read_clock(self->recorder, &end) < 0) {
        ls_report_fault(self->recorder);
        return result;
    }
    if (end > start)
        self->waited += end - start;
    return result;
}

static PyObject *TimedPoller_poll(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                                  PyObject *kwnames) {
    return timed_wait((TimedPoller *)op, ls_str.poll, args, nargs, kwnames);
}

/* kqueue: control(None, max_events, timeout) is the wait; a changelist registers, untimed. */
static PyObject *TimedPoller_control(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                                     PyObject *kwnames) {
    TimedPoller *self = (TimedPoller *)op;
    if (nargs >= 1 && args[0] == Py_None)
        return timed_wait(self, ls_str.control, args, nargs, kwnames);
    return call_poller(self, ls_str.control, args, nargs, kwnames);
}

/* Every other attribute is the poller's (register, modify, unregister, fileno, close,
 * closed, ...), so the selector uses it as it would use the poller itself. */
static PyObject *TimedPoller_getattro(PyObject *op, PyObject *name) {
    TimedPoller *self = (TimedPoller *)op;
    /* and what the poller lacks of the two, its stand-in lacks too */
    if (!(self->has_poll && self->has_control) && PyUnicode_Check(name)) {
        int poll = name == ls_str.poll || PyUnicode_Compare(name, ls_str.poll) == 0;
        int control = !poll && (name == ls_str.control ||
                                PyUnicode_Compare(name, ls_str.control) == 0);
        if ((poll && !self->has_poll) || (control && !self->has_control))
            return PyObject_GetAttr(self->poller, name);
    }
    PyObject *value = PyObject_GenericGetAttr(op, name);
    if (value != NULL || !PyErr_ExceptionMatches(PyExc_AttributeError))
        return value;
    PyErr_Clear();
    return PyObject_GetAttr(((TimedPoller *)op)->poller, name);
}

static PyObject *TimedPoller_repr(PyObject *op) {
    return PyObject_Repr(((TimedPoller *)op)->poller);
}

static PyObject *TimedPoller_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"poller", "recorder", NULL};
    PyObject *poller, *recorder;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO!:TimedPoller", kwlist, &poller,
                                     &ls_Recorder_Type, &recorder))
        return NULL;
    if (ls_ready_recorder((Recorder *)recorder) < 0)
        return NULL;
    TimedPoller *self = (TimedPoller *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->recorder = (Recorder *)Py_NewRef(recorder);
    self->poller = Py_NewRef(poller);
    self->waited = 0.0;
    self->has_poll = (char)PyObject_HasAttr(poller, ls_str.poll);
    self->has_control = (char)PyObject_HasAttr(poller, ls_str.control);
    return (PyObject *)self;
}

#define TIMEDPOLLER_FIELDS(X) X(recorder) X(poller)
LS_GC_FUNCTIONS(TimedPoller, TIMEDPOLLER_FIELDS)

static PyMethodDef TimedPoller_methods[] = {
    {"poll", (PyCFunction)(void (*)(void))TimedPoller_poll, METH_FASTCALL | METH_KEYWORDS,
     "poll($self, /, *args, **kwargs)\n--\n\nThe poller's poll(), timed."},
    {"control", (PyCFunction)(void (*)(void))TimedPoller_control,
     METH_FASTCALL | METH_KEYWORDS,
     "control($self, /, *args, **kwargs)\n--\n\n"
     "The poller's control(), timed when it waits (no changelist)."},
    {NULL}};

static PyMemberDef TimedPoller_members[] = {
    {"poller", T_OBJECT, offsetof(TimedPoller, poller), READONLY, NULL},
    {"waited", T_DOUBLE, offsetof(TimedPoller, waited), READONLY, NULL},
    {NULL}};

PyTypeObject ls_TimedPoller_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopscope._speedups.TimedPoller",
    .tp_basicsize = sizeof(TimedPoller),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "TimedPoller(poller, recorder)\n--\n\n"
              "Stands in for a selector's poller, counting the seconds waited in it.",
    .tp_new = TimedPoller_new,
    .tp_traverse = (traverseproc)TimedPoller_traverse,
    .tp_clear = (inquiry)TimedPoller_clear,
    .tp_dealloc = ls_gc_dealloc,
    .tp_getattro = TimedPoller_getattro,
    .tp_repr = TimedPoller_repr,
    .tp_methods = TimedPoller_methods,
    .tp_members = TimedPoller_members,
};
