/*
 * loopscope._speedups.Recorder (LoopProbe.after_step in C: see speedups.h), CreateTask and
 * RunForever.
 */
#include "speedups.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

/* The histograms' bounds: loopscope._stats.BUCKETS, read at module init (set_bounds). */
double ls_buckets[NBUCKETS - 1];
#define BUCKETS ls_buckets

/* Where getattr(callback, "__self__") is a getset of an immutable type (asyncio's C task
 * step wrapper), that getter is called directly: same result, a tenth of the work. */
static PyTypeObject *self_type;
static getter self_get;
static void *self_closure;
static PyObject *time_monotonic; /* time.monotonic, to recognise the default clock */

/* ---------------------------------------------------------------------------------------
 * The bucket search.  bucket_of's table (speedups.h), filled at module init:
 */
unsigned char ls_bucket_start[2048];
#define bucket_start ls_bucket_start

static int bad_bounds(const char *what) {
    PyErr_Format(PyExc_ImportError,
                 "loopscope._speedups: loopscope._stats.BUCKETS %s: it must hold %d finite "
                 "positive bounds, each at least twice the one before (as the C bucket "
                 "search requires)",
                 what, NBUCKETS - 1);
    return -1;
}

/* BUCKETS and bucket_start from the Python bounds; -1 with ImportError set if they are not
 * what bucket_of() needs. */
static int set_bounds(PyObject *bounds) {
    double values[NBUCKETS - 1];
    PyObject *seq = PySequence_Fast(bounds, "");
    if (seq == NULL) {
        PyErr_Clear();
        return bad_bounds("is not a sequence");
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n != NBUCKETS - 1) {
        char what[64];
        snprintf(what, sizeof what, "has %zd bounds", n);
        Py_DECREF(seq);
        return bad_bounds(what);
    }
    for (Py_ssize_t i = 0; i < NBUCKETS - 1; i++) {
        values[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, i));
        if (values[i] == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            Py_DECREF(seq);
            return bad_bounds("holds something other than a number");
        }
    }
    Py_DECREF(seq);
    if (!(isfinite(values[0]) && values[0] >= DBL_MIN)) /* a positive normal double */
        return bad_bounds("starts with a bound that is not a positive finite number");
    for (int i = 1; i < NBUCKETS - 1; i++) {
        if (!(isfinite(values[i]) && values[i] >= 2.0 * values[i - 1]))
            return bad_bounds("has a bound less than twice the one before, or not finite");
    }
    memcpy(BUCKETS, values, sizeof(BUCKETS));
    for (int biased = 0; biased < 2048; biased++) {
        /* the exponent field's power of two; 0 for the subnormals (below every bound) */
        double power = biased == 0 ? 0.0 : ldexp(1.0, biased - 1023);
        int i = 0;
        while (i < NBUCKETS - 2 && BUCKETS[i] < power)
            i++;
        bucket_start[biased] = (unsigned char)i;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * LoopProbe.after_step / after_io
 */
/* probe.<method>(callback, task, start, duration): record_slow, or offer_exemplar for a task
 * step that may carry an exemplar */
static int call_probe(Recorder *r, PyObject *method, PyObject *callback, PyObject *owner,
                      double start, double duration) {
    PyObject *a = PyFloat_FromDouble(start);
    PyObject *d = a != NULL ? PyFloat_FromDouble(duration) : NULL;
    PyObject *args[5] = {r->probe, callback, owner != NULL ? owner : Py_None, a, d};
    PyObject *res = d != NULL ? PyObject_VectorcallMethod(
                                    method, args, 5 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL)
                              : NULL;
    Py_XDECREF(a);
    Py_XDECREF(d);
    Py_XDECREF(res);
    return res == NULL ? -1 : 0;
}

/* getattr(callback, "__self__", None) as a new reference (or NULL for None); -1 on error */
static int owner_of(PyObject *callback, PyObject **owner) {
    PyTypeObject *tp = Py_TYPE(callback);
    *owner = NULL;
    if (tp == &PyMethod_Type) {
        *owner = Py_NewRef(PyMethod_GET_SELF(callback));
        return 0;
    }
    if (tp != self_type) {
        if (!(tp->tp_flags & Py_TPFLAGS_IMMUTABLETYPE))
            return lookup_optional(callback, ls_str.self, owner);
        PyObject *descr = _PyType_Lookup(tp, ls_str.self); /* borrowed */
        if (descr == NULL || !Py_IS_TYPE(descr, &PyGetSetDescr_Type) ||
            ((PyGetSetDescrObject *)descr)->d_getset->get == NULL)
            return lookup_optional(callback, ls_str.self, owner);
        Py_INCREF(tp);
        Py_XSETREF(self_type, tp);
        self_get = ((PyGetSetDescrObject *)descr)->d_getset->get;
        self_closure = ((PyGetSetDescrObject *)descr)->d_getset->closure;
    }
    *owner = self_get(callback, self_closure);
    if (*owner == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            return -1;
        PyErr_Clear();
    }
    return 0;
}

/* LoopProbe.after_io */
int ls_record_io(Recorder *r, PyObject *callback, double start, double end) {
    double duration = end > start ? end - start : 0.0;
    r->duration_counts[bucket_of(duration)]++;
    r->duration_total += duration;
    if (r->busy_from_callbacks)
        r->busy_seconds += duration;
    if (duration >= r->threshold)
        return call_probe(r, ls_str.record_slow, callback, NULL, start, duration);
    return 0;
}

/* LoopProbe.after_step past ls_record (speedups.h).  Whether tp has the name of asyncio's
 * C task step wrapper (TaskStepMethWrapper to 3.11, _asyncio.TaskStepMethWrapper after). */
static int is_step_wrapper_name(PyTypeObject *tp) {
    return strcmp(tp->tp_name, "TaskStepMethWrapper") == 0 ||
           strcmp(tp->tp_name, "_asyncio.TaskStepMethWrapper") == 0;
}

/* Whether callback is a step of a task of r->task_types: 1 with *owner the task (a new
 * reference), 0 with *owner NULL, -1 on error. */
static int task_of(Recorder *r, PyObject *callback, PyObject **owner) {
    if (owner_of(callback, owner) < 0)
        return -1;
    if (*owner == Py_None)
        Py_CLEAR(*owner);
    if (*owner == NULL)
        return 0;
    PyObject *types = r->task_types;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(types); i++) {
        if ((PyObject *)Py_TYPE(*owner) == PyTuple_GET_ITEM(types, i)) {
            /* asyncio's C task schedules every step with a wrapper of one type whose
             * __self__ is the task (a C task, or a subclass of it): once a C task of
             * task_types is seen through it, its steps are told apart by their type. */
            PyTypeObject *tp = Py_TYPE(callback);
            if (r->step_type == NULL && tp == self_type && is_step_wrapper_name(tp) &&
                strcmp(Py_TYPE(*owner)->tp_name, "_asyncio.Task") == 0)
                r->step_type = (PyTypeObject *)Py_NewRef(tp);
            return 1;
        }
    }
    int is_task = PyObject_IsInstance(*owner, types);
    if (is_task <= 0)
        Py_CLEAR(*owner);
    return is_task;
}

int ls_record_owner(Recorder *r, PyObject *callback, double start, double duration) {
    PyObject *owner = NULL; /* the task (a new reference), or NULL */
    int is_task;
    if (Py_TYPE(callback) == r->step_type) {
        is_task = 1; /* counted by ls_record */
    }
    else {
        is_task = task_of(r, callback, &owner);
        if (is_task < 0)
            return -1;
        if (is_task)
            r->task_steps++;
    }
    if (duration < r->floor) {
        Py_XDECREF(owner);
        return 0;
    }
    if (is_task && owner == NULL) {
        if (owner_of(callback, &owner) < 0)
            return -1;
        if (owner == Py_None)
            Py_CLEAR(owner);
    }
    int rc = 0;
    if (duration >= r->threshold)
        rc = call_probe(r, ls_str.record_slow, callback, owner, start, duration);
    else if (owner != NULL)
        rc = call_probe(r, ls_str.offer_exemplar, callback, owner, start, duration);
    Py_XDECREF(owner);
    return rc;
}

/* probe.fault(exc) */
void ls_report_fault(Recorder *r) {
    PyObject *exc = exc_take();
    if (exc == NULL)
        return;
    PyObject *res = PyObject_CallMethodOneArg(r->probe, ls_str.fault, exc);
    Py_DECREF(exc);
    if (res == NULL)
        PyErr_WriteUnraisable(r->probe);
    else
        Py_DECREF(res);
}

/* ---------------------------------------------------------------------------------------
 * Recorder
 */
static void free_slot(Recorder *r) {
    if (r->slot >= 0) {
        ls_free_slot(r->slot);
        r->slot = -1;
    }
    r->start = &r->own_start;
}

static int Recorder_init(Recorder *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"probe", "clock", "threshold", "busy_from_callbacks", "task_types",
                             NULL};
    PyObject *probe, *clock, *task_types;
    double threshold;
    int busy;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOdpO!:Recorder", kwlist, &probe, &clock,
                                     &threshold, &busy, &PyTuple_Type, &task_types))
        return -1;
    Py_XSETREF(self->probe, Py_NewRef(probe));
    Py_XSETREF(self->clock, Py_NewRef(clock));
    Py_XSETREF(self->task_types, Py_NewRef(task_types));
    Py_CLEAR(self->step_type);
    self->native_clock = (clock == time_monotonic);
#ifdef _WIN32
    self->native_clock = 0;
#endif
    free_slot(self);
    if (self->native_clock) {
        self->slot = ls_take_slot();
        if (self->slot >= 0)
            self->start = ls_slot_start(self->slot);
    }
    self->threshold = threshold;
    self->exemplar_floor = INFINITY;
    self->floor = threshold;
    self->busy_from_callbacks = busy;
    return 0;
}

#define RECORDER_FIELDS(X) X(probe) X(clock) X(task_types) X(current_callback) X(step_type)
LS_GC_FUNCTIONS(Recorder, RECORDER_FIELDS)

static PyObject *Recorder_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    Recorder *self = (Recorder *)PyType_GenericNew(type, args, kwds);
    if (self != NULL) {
        self->slot = -1;
        self->start = &self->own_start;
    }
    return (PyObject *)self;
}

static void Recorder_dealloc(Recorder *self) {
    PyObject_GC_UnTrack(self);
    free_slot(self);
    Recorder_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

int ls_ready_recorder(Recorder *r) {
    if (r->probe == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Recorder was not initialised");
        return -1;
    }
    return 0;
}

/* obj.name = obj.name + delta (an int or a float) */
static int add_attr(PyObject *obj, PyObject *name, PyObject *delta) {
    PyObject *old = PyObject_GetAttr(obj, name);
    if (old == NULL)
        return -1;
    PyObject *sum = PyNumber_Add(old, delta);
    Py_DECREF(old);
    if (sum == NULL)
        return -1;
    int rc = PyObject_SetAttr(obj, name, sum);
    Py_DECREF(sum);
    return rc;
}

static int add_float_attr(PyObject *obj, PyObject *name, double *delta) {
    if (*delta == 0.0)
        return 0;
    PyObject *d = PyFloat_FromDouble(*delta);
    if (d == NULL)
        return -1;
    int rc = add_attr(obj, name, d);
    Py_DECREF(d);
    if (rc == 0)
        *delta = 0.0;
    return rc;
}

static int add_int_attr(PyObject *obj, PyObject *name, unsigned long long *delta) {
    if (*delta == 0)
        return 0;
    PyObject *d = PyLong_FromUnsignedLongLong(*delta);
    if (d == NULL)
        return -1;
    int rc = add_attr(obj, name, d);
    Py_DECREF(d);
    if (rc == 0)
        *delta = 0;
    return rc;
}

static int flush_histogram(PyObject *stats, PyObject *name, unsigned long long *counts,
                           double *total) {
    PyObject *hist = PyObject_GetAttr(stats, name);
    if (hist == NULL)
        return -1;
    PyObject *list = PyObject_GetAttr(hist, ls_str.counts);
    if (list == NULL)
        goto error;
    if (!PyList_Check(list) || PyList_GET_SIZE(list) != NBUCKETS) {
        PyErr_SetString(PyExc_ValueError, "histogram counts must be a list of 20 ints");
        goto error;
    }
    for (Py_ssize_t i = 0; i < NBUCKETS; i++) {
        if (counts[i] == 0)
            continue;
        PyObject *d = PyLong_FromUnsignedLongLong(counts[i]);
        if (d == NULL)
            goto error;
        PyObject *sum = PyNumber_Add(PyList_GET_ITEM(list, i), d);
        Py_DECREF(d);
        if (sum == NULL)
            goto error;
        PyList_SetItem(list, i, sum); /* steals sum */
        counts[i] = 0;
    }
    if (add_float_attr(hist, ls_str.total, total) < 0)
        goto error;
    Py_DECREF(list);
    Py_DECREF(hist);
    return 0;
error:
    Py_XDECREF(list);
    Py_DECREF(hist);
    return -1;
}

static PyObject *Recorder_flush(Recorder *self, PyObject *stats) {
    if (ls_ready_recorder(self) < 0)
        return NULL;
    if (flush_histogram(stats, ls_str.callback_duration, self->duration_counts,
                        &self->duration_total) < 0 ||
        flush_histogram(stats, ls_str.schedule_delay, self->delay_counts, &self->delay_total) < 0 ||
        add_float_attr(stats, ls_str.busy_seconds, &self->busy_seconds) < 0 ||
        add_int_attr(stats, ls_str.task_steps, &self->task_steps) < 0 ||
        add_int_attr(stats, ls_str.tasks_created, &self->tasks_created) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Recorder_record(Recorder *self, PyObject *const *args, Py_ssize_t nargs) {
    if (ls_ready_recorder(self) < 0)
        return NULL;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "record(callback, ready, start, end)");
        return NULL;
    }
    double v[3];
    for (int i = 0; i < 3; i++) {
        v[i] = PyFloat_AsDouble(args[i + 1]);
        if (v[i] == -1.0 && PyErr_Occurred())
            return NULL;
    }
    if (ls_record(self, args[0], v[0], v[1], v[2]) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Recorder_record_io(Recorder *self, PyObject *const *args, Py_ssize_t nargs) {
    if (ls_ready_recorder(self) < 0)
        return NULL;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "record_io(callback, start, end)");
        return NULL;
    }
    double v[2];
    for (int i = 0; i < 2; i++) {
        v[i] = PyFloat_AsDouble(args[i + 1]);
        if (v[i] == -1.0 && PyErr_Occurred())
            return NULL;
    }
    if (ls_record_io(self, args[0], v[0], v[1]) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Recorder_pending(Recorder *self, PyObject *Py_UNUSED(ignored)) {
    /* Whether any figure is waiting for flush() (for tests). */
    int any = self->duration_total != 0.0 || self->delay_total != 0.0 ||
              self->busy_seconds != 0.0 || self->task_steps != 0 || self->tasks_created != 0;
    for (int i = 0; i < NBUCKETS && !any; i++)
        any = self->duration_counts[i] != 0 || self->delay_counts[i] != 0;
    return PyBool_FromLong(any);
}

static PyMethodDef Recorder_methods[] = {
    {"flush", (PyCFunction)Recorder_flush, METH_O,
     "flush($self, stats, /)\n--\n\nFold the figures kept here into a LoopStats and reset them."},
    {"record", (PyCFunction)(void (*)(void))Recorder_record, METH_FASTCALL,
     "record($self, callback, ready, start, end, /)\n--\n\nRecord one callback that became "
     "runnable at ready and ran from start to end."},
    {"record_io", (PyCFunction)(void (*)(void))Recorder_record_io, METH_FASTCALL,
     "record_io($self, callback, start, end, /)\n--\n\nRecord one I/O callback "
     "(no schedule delay, not a task step)."},
    {"pending", (PyCFunction)Recorder_pending, METH_NOARGS,
     "pending($self, /)\n--\n\nTrue if figures are waiting for flush()."},
    {NULL}};

static PyObject *Recorder_get_watched(Recorder *self, void *Py_UNUSED(closure)) {
    return PyBool_FromLong(self->slot >= 0);
}

static PyObject *Recorder_get_current_start(Recorder *self, void *Py_UNUSED(closure)) {
    return PyFloat_FromDouble(load_start(self));
}

static int Recorder_set_current_start(Recorder *self, PyObject *value, void *Py_UNUSED(c)) {
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "current_start cannot be deleted");
        return -1;
    }
    double start = PyFloat_AsDouble(value);
    if (start == -1.0 && PyErr_Occurred())
        return -1;
    STORE_START(self, start);
    return 0;
}

static PyObject *Recorder_get_exemplar_floor(Recorder *self, void *Py_UNUSED(closure)) {
    return PyFloat_FromDouble(self->exemplar_floor);
}

static int Recorder_set_exemplar_floor(Recorder *self, PyObject *value, void *Py_UNUSED(c)) {
    double floor = value != NULL ? PyFloat_AsDouble(value) : -1.0;
    if (value == NULL)
        PyErr_SetString(PyExc_AttributeError, "exemplar_floor cannot be deleted");
    if (floor == -1.0 && PyErr_Occurred())
        return -1;
    self->exemplar_floor = floor;
    self->floor = floor < self->threshold ? floor : self->threshold;
    return 0;
}

static PyObject *Recorder_get_current_callback(Recorder *self, void *Py_UNUSED(closure)) {
    return Py_NewRef(self->current_callback != NULL ? self->current_callback : Py_None);
}

static int Recorder_set_current_callback(Recorder *self, PyObject *value,
                                         void *Py_UNUSED(closure)) {
    Py_XSETREF(self->current_callback, value == NULL || value == Py_None ? NULL
                                                                        : Py_NewRef(value));
    return 0;
}

static PyGetSetDef Recorder_getset[] = {
    {"current_start", (getter)Recorder_get_current_start, (setter)Recorder_set_current_start,
     "Start of the step running now (the probe's clock), 0.0 between steps.", NULL},
    {"watched", (getter)Recorder_get_watched, NULL,
     "Whether watch_steps() sees this recorder's steps (it has a start slot).", NULL},
    {"exemplar_floor", (getter)Recorder_get_exemplar_floor, (setter)Recorder_set_exemplar_floor,
     "Task steps from this long to threshold go to probe.offer_exemplar().", NULL},
    {"current_callback", (getter)Recorder_get_current_callback,
     (setter)Recorder_set_current_callback, "The callback of the step running now, or None.",
     NULL},
    {NULL}};

static PyMemberDef Recorder_members[] = {
    {"probe", T_OBJECT, offsetof(Recorder, probe), READONLY, NULL},
    {"threshold", T_DOUBLE, offsetof(Recorder, threshold), READONLY, NULL},
    {"busy_from_callbacks", T_INT, offsetof(Recorder, busy_from_callbacks), 0, NULL},
    {"chain_end", T_DOUBLE, offsetof(Recorder, chain_end), 0, NULL},
    {NULL}};

PyTypeObject ls_Recorder_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopscope._speedups.Recorder",
    .tp_basicsize = sizeof(Recorder),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Recorder(probe, clock, threshold, busy_from_callbacks, task_types)\n--\n\n"
              "Per-loop figures kept in C; folded into a LoopStats by flush().",
    .tp_new = Recorder_new,
    .tp_init = (initproc)Recorder_init,
    .tp_dealloc = (destructor)Recorder_dealloc,
    .tp_traverse = (traverseproc)Recorder_traverse,
    .tp_clear = (inquiry)Recorder_clear,
    .tp_methods = Recorder_methods,
    .tp_members = Recorder_members,
    .tp_getset = Recorder_getset,
};

/* ---------------------------------------------------------------------------------------
 * CreateTask (both loops): the loop's create_task, counting the tasks it returns.  Every
 * argument goes to the loop's own create_task unchanged, so its errors are the loop's; and
 * no Python frame of loopscope's is in a task's _source_traceback in debug mode.
 */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *create; /* the loop's bound create_task */
    Recorder *recorder;
} CreateTask;

static PyObject *CreateTask_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf,
                                       PyObject *kwnames) {
    CreateTask *self = (CreateTask *)op;
    if (self->create == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "CreateTask: cleared");
        return NULL;
    }
    PyObject *task = PyObject_Vectorcall(self->create, args, nargsf, kwnames);
    if (task != NULL)
        self->recorder->tasks_created++;
    return task;
}

static PyObject *CreateTask_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *create, *recorder;
    static char *kwlist[] = {"create_task", "recorder", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO!:CreateTask", kwlist, &create,
                                     &ls_Recorder_Type, &recorder))
        return NULL;
    CreateTask *self = (CreateTask *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = CreateTask_vectorcall;
    self->create = Py_NewRef(create);
    self->recorder = (Recorder *)Py_NewRef(recorder);
    return (PyObject *)self;
}

#define CREATETASK_FIELDS(X) X(create) X(recorder)
LS_GC_FUNCTIONS(CreateTask, CREATETASK_FIELDS)

static PyObject *CreateTask_repr(CreateTask *self) {
    if (self->create == NULL)
        return PyUnicode_FromString("<CreateTask (cleared)>");
    return PyObject_Repr(self->create);
}

static PyMemberDef CreateTask_members[] = {
    {"create_task", T_OBJECT, offsetof(CreateTask, create), READONLY, NULL},
    LS_VECTORCALL_MEMBER(CreateTask),
    {NULL}};

PyTypeObject ls_CreateTask_Type = {
    LS_CALLABLE_TYPE(CreateTask, 0),
    .tp_doc = "CreateTask(create_task, recorder)\n--\n\n"
              "The loop's create_task, counting the tasks it creates; repr() is the loop's.",
    .tp_dealloc = ls_gc_dealloc,
    .tp_repr = (reprfunc)CreateTask_repr,
    .tp_members = CreateTask_members,
};

/* ---------------------------------------------------------------------------------------
 * RunForever (both loops): the loop's run_forever between start() and stop().  No frame of
 * loopscope's stays on the stack while the loop runs, so the stacks that debug mode keeps
 * (a handle's, a future's or a task's source traceback, a coroutine's origin) are the
 * stacks the program has without loopscope.
 */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *start;       /* start(): whether this run is measured (then stop() follows) */
    PyObject *run_forever; /* the loop's bound run_forever */
    PyObject *stop;
} RunForever;

static void exc_discard(saved_exc *s) {
#if PY_VERSION_HEX >= 0x030C0000
    Py_XDECREF(s->exc);
#else
    Py_XDECREF(s->type);
    Py_XDECREF(s->value);
    Py_XDECREF(s->tb);
#endif
}

static PyObject *RunForever_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf,
                                       PyObject *kwnames) {
    RunForever *self = (RunForever *)op;
    if (self->run_forever == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "RunForever: cleared");
        return NULL;
    }
    PyObject *started = PyObject_CallNoArgs(self->start);
    if (started == NULL)
        return NULL;
    int measured = PyObject_IsTrue(started);
    Py_DECREF(started);
    if (measured < 0)
        return NULL;
    PyObject *result = PyObject_Vectorcall(self->run_forever, args, nargsf, kwnames);
    if (!measured)
        return result;
    /* finally: stop() (an exception of its own wins, as in a finally block) */
    saved_exc saved = {0};
    if (result == NULL)
        exc_save(&saved);
    PyObject *stopped = PyObject_CallNoArgs(self->stop);
    if (stopped == NULL) {
        Py_XDECREF(result);
        exc_discard(&saved);
        return NULL;
    }
    Py_DECREF(stopped);
    if (result == NULL)
        exc_restore(&saved);
    return result;
}

static PyObject *RunForever_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *start, *run_forever, *stop;
    static char *kwlist[] = {"start", "run_forever", "stop", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO:RunForever", kwlist, &start,
                                     &run_forever, &stop))
        return NULL;
    RunForever *self = (RunForever *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = RunForever_vectorcall;
    self->start = Py_NewRef(start);
    self->run_forever = Py_NewRef(run_forever);
    self->stop = Py_NewRef(stop);
    return (PyObject *)self;
}

#define RUNFOREVER_FIELDS(X) X(start) X(run_forever) X(stop)
LS_GC_FUNCTIONS(RunForever, RUNFOREVER_FIELDS)

static PyObject *RunForever_repr(RunForever *self) {
    if (self->run_forever == NULL)
        return PyUnicode_FromString("<RunForever (cleared)>");
    return PyObject_Repr(self->run_forever);
}

static PyMemberDef RunForever_members[] = {
    {"run_forever", T_OBJECT, offsetof(RunForever, run_forever), READONLY, NULL},
    LS_VECTORCALL_MEMBER(RunForever),
    {NULL}};

PyTypeObject ls_RunForever_Type = {
    LS_CALLABLE_TYPE(RunForever, 0),
    .tp_doc = "RunForever(start, run_forever, stop)\n--\n\n"
              "The loop's run_forever between start() and stop(), which follows when start()\n"
              "returned true; repr() is the loop's.",
    .tp_dealloc = ls_gc_dealloc,
    .tp_repr = (reprfunc)RunForever_repr,
    .tp_members = RunForever_members,
};

/* ---------------------------------------------------------------------------------------
 * module init
 */
int ls_recorder_init(PyObject *bounds) {
    if (set_bounds(bounds) < 0)
        return -1;
    PyObject *time_module = PyImport_ImportModule("time");
    if (time_module == NULL)
        return -1;
    time_monotonic = PyObject_GetAttrString(time_module, "monotonic");
    Py_DECREF(time_module);
    return time_monotonic == NULL ? -1 : 0;
}
