/*
 * loopscope._speedups: the per-callback hot path in C.
 *
 * Optional: loopscope works without it (the pure-Python hooks), and LOOPSCOPE_PURE_PYTHON=1
 * forces the pure path.  What is here mirrors, step for step, the pure-Python code:
 *
 *   Recorder       LoopProbe.after_step: the two histograms, busy time, task steps and the
 *                  slow-step counters, kept as C numbers and folded into the probe's
 *                  LoopStats by flush() (called under the series book's lock at scrape time
 *                  and when a loop's figures are retired).  The slow path (the structlog
 *                  event) calls back into Python exactly as the pure path does.
 *   TimedCallback  uvloop: the wrapper around each scheduled callback (repr delegates).
 *   TimedIO        uvloop: the wrapper around reader/writer callbacks and protocol methods.
 *   Intercept      uvloop: the call_soon / call_soon_threadsafe / call_later instance
 *                  attributes; anything unusual is handed to the pure-Python function, so
 *                  argument errors are the same.
 *   CallSoon       asyncio: the loop's _call_soon instance attribute.
 *   TimedRun       asyncio: the _run method of the per-loop Handle/TimerHandle subclasses.
 *   CreateTask     both loops: the loop's create_task instance attribute, counting tasks.
 *   Engine         the /metrics endpoint's socket work, without the GIL (_endpoint.c).
 *   watch_steps    the watchdog thread's wait between checks, without the GIL.
 *   clock_*        the native clock (_clock.c): time.monotonic() from the CPU's counter.
 *
 * Every object runs with the GIL held and never releases it, so a flush from a scrape
 * thread and the loop thread's updates cannot interleave; watch_steps only reads the step
 * start slots while it is without the GIL.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "_clock.h"

#define NBUCKETS 20 /* 19 bounds + the +Inf slot */
/* What the Python side expects of this module (_probe.SPEEDUPS_INTERFACE): raised whenever
 * the two change together, so that a module built from older sources is not used. */
#define SPEEDUPS_INTERFACE 6

extern PyTypeObject Engine_Type; /* _endpoint.c */

static const double BUCKETS[NBUCKETS - 1] = {
    0.00001, 0.000025, 0.00005,
    0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05,
    0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
    10.0,
};

/* Interned attribute names, created at module init. */
static PyObject *s_callback_duration, *s_schedule_delay, *s_counts, *s_total;
static PyObject *s_busy_seconds, *s_task_steps, *s_tasks_created;
static PyObject *s_self, *s_callback;
static PyObject *s_fault, *s_context, *s_record_slow, *s_active;
static PyObject *s_context_slot, *s_args, *s_run;
static PyObject *seen_context; /* a "context" keyword name object seen from callers */
static PyObject *empty_tuple;

/* Where getattr(callback, "__self__") is a getset of an immutable type (asyncio's C task
 * step wrapper), that getter is called directly: same result, a tenth of the work. */
static PyTypeObject *self_type;
static getter self_get;
static void *self_closure;
static PyObject *time_monotonic; /* time.monotonic, to recognise the default clock */

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

static inline int exc_pending(saved_exc *s) {
#if PY_VERSION_HEX >= 0x030C0000
    return s->exc != NULL;
#else
    return s->type != NULL;
#endif
}

static int lookup_optional(PyObject *obj, PyObject *name, PyObject **result) {
#if PY_VERSION_HEX >= 0x030D0000
    return PyObject_GetOptionalAttr(obj, name, result);
#else
    return _PyObject_LookupAttr(obj, name, result);
#endif
}

/* The offset of a writable object slot (a __slots__ entry) of ``tp``, or -1. */
static Py_ssize_t slot_offset(PyTypeObject *tp, PyObject *name) {
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

/* ---------------------------------------------------------------------------------------
 * Recorder
 */
typedef struct {
    PyObject_HEAD
    PyObject *probe;
    PyObject *clock;       /* the probe's clock callable */
    PyObject *task_types;  /* tuple of task classes */
    /* The watchdog's step markers (see mark_start): read by the watchdog thread through
     * the current_start / current_callback attributes with the GIL held.  The start lives
     * at *start: a slot of start_slots (below) that watch_steps() reads without the GIL,
     * or own_start for a recorder on another clock or when every slot is taken. */
    double *start;
    double own_start;
    int slot;              /* index in start_slots, or -1 */
    PyObject *current_callback; /* strong reference while a step runs, else NULL */
    int native_clock;      /* clock is time.monotonic: read it here */
    int busy_from_callbacks;
    double threshold;
    /* figures not yet folded into the probe's LoopStats */
    unsigned long long duration_counts[NBUCKETS];
    unsigned long long delay_counts[NBUCKETS];
    double duration_total, delay_total, busy_seconds;
    unsigned long long task_steps;
    unsigned long long tasks_created;
} Recorder;

static PyTypeObject Recorder_Type;

/* bisect_left(BUCKETS, value): the first bound >= value.  The value's binary exponent picks
 * the first bound at or above its power of two (bucket_start, filled at module init); no
 * two bounds share a power of two (each is at least twice the one before), so at most
 * one more comparison finishes the search. */
#define EXP_LOW (-18) /* 2**-18 < BUCKETS[0] */
#define EXP_HIGH 4    /* BUCKETS[NBUCKETS - 2] < 2**4 */
static unsigned char bucket_start[EXP_HIGH - EXP_LOW];

static int fill_bucket_start(void) {
    if (!(BUCKETS[0] > ldexp(1.0, EXP_LOW) && BUCKETS[NBUCKETS - 2] < ldexp(1.0, EXP_HIGH))) {
        PyErr_SetString(PyExc_SystemError, "BUCKETS outside the exponent table");
        return -1;
    }
    for (int i = 0; i + 1 < NBUCKETS - 1; i++) {
        if (!(BUCKETS[i + 1] >= 2.0 * BUCKETS[i])) {
            PyErr_SetString(PyExc_SystemError, "two BUCKETS bounds within a power of two");
            return -1;
        }
    }
    for (int e = EXP_LOW; e < EXP_HIGH; e++) {
        double power = ldexp(1.0, e);
        int i = 0;
        while (i < NBUCKETS - 1 && BUCKETS[i] < power)
            i++;
        bucket_start[e - EXP_LOW] = (unsigned char)i;
    }
    return 0;
}

static inline Py_ssize_t bucket_of(double value) {
    if (!(value > BUCKETS[0])) /* also 0, negatives and NaN, as bisect_left puts them */
        return 0;
    if (!(value <= BUCKETS[NBUCKETS - 2]))
        return NBUCKETS - 1;
    uint64_t bits;
    memcpy(&bits, &value, sizeof(bits));
    int e = (int)((bits >> 52) & 0x7ff) - 1023; /* 2**e <= value < 2**(e+1) */
    Py_ssize_t i = bucket_start[e - EXP_LOW];
    if (BUCKETS[i] < value)
        i++;
    return i;
}

/* The clock as a C double; -1 with an exception set on failure. */
static inline int read_clock(Recorder *r, double *out) {
    if (r->native_clock) {
        *out = native_now();
        return 0;
    }
    PyObject *value = PyObject_CallNoArgs(r->clock);
    if (value == NULL)
        return -1;
    *out = PyFloat_AsDouble(value);
    Py_DECREF(value);
    if (*out == -1.0 && PyErr_Occurred())
        return -1;
    return 0;
}

/* The starts of the steps running now, one slot per recorder on the native clock, in
 * memory that is never freed: the watchdog's wait (watch_steps) reads them without the
 * GIL and without holding any recorder, so neither a recorder nor its loop is kept alive
 * by it.  A slot freed and taken again is at worst read as another loop's start, which
 * only makes the watchdog look (with the GIL) one interval early.  Slots are padded to a
 * cache line each: loops in different threads do not share one.  Taken and freed with
 * the GIL held; stored and loaded as relaxed atomics (a plain move on x86-64 and arm64). */
#define START_SLOTS 1024
typedef struct {
    double start;
    char pad[64 - sizeof(double)];
} StartSlot;
static StartSlot start_slots[START_SLOTS];
static unsigned char slot_taken[START_SLOTS];
static int slots_high; /* 1 + the highest slot ever taken: watch_steps reads up to it */

#if defined(__GNUC__) || defined(__clang__)
static inline void store_double(double *at, double value) {
    __atomic_store(at, &value, __ATOMIC_RELAXED);
}
static inline double load_double(double *at) {
    double value;
    __atomic_load(at, &value, __ATOMIC_RELAXED);
    return value;
}
#else
static inline void store_double(double *at, double value) {
    *(volatile double *)at = value;
}
static inline double load_double(double *at) {
    return *(volatile double *)at;
}
#endif

static int take_slot(void) {
    for (int i = 0; i < START_SLOTS; i++) {
        if (!slot_taken[i]) {
            slot_taken[i] = 1;
            store_double(&start_slots[i].start, 0.0);
            if (i >= slots_high) {
#if defined(__GNUC__) || defined(__clang__)
                __atomic_store_n(&slots_high, i + 1, __ATOMIC_RELEASE);
#else
                slots_high = i + 1;
#endif
            }
            return i;
        }
    }
    return -1;
}

static void free_slot(Recorder *r) {
    if (r->slot >= 0) {
        store_double(&start_slots[r->slot].start, 0.0);
        slot_taken[r->slot] = 0;
        r->slot = -1;
    }
    r->start = &r->own_start;
}

#define STORE_START(r, value) store_double((r)->start, (value))
static inline double load_start(Recorder *r) {
    return load_double(r->start);
}

/* The watchdog's step markers: the start of the step running now (0.0 between steps) and
 * its callback.  They live here rather than in the probe's __dict__ because four dict
 * stores and a float per step were about half of what the C path added on uvloop; the
 * pure-Python hooks write the same two attributes of the recorder (probe.marks). */
static inline void mark_start(Recorder *r, PyObject *callback, double start) {
    STORE_START(r, start);
    Py_XSETREF(r->current_callback, Py_NewRef(callback));
}

static inline void mark_end(Recorder *r) {
    STORE_START(r, 0.0);
    Py_CLEAR(r->current_callback); /* the caller still holds the callback: no dealloc here */
}

/* probe.record_slow(callback, task, start, duration) */
static int record_slow(Recorder *r, PyObject *callback, PyObject *owner, double start,
                       double duration) {
    PyObject *a = PyFloat_FromDouble(start);
    if (a == NULL)
        return -1;
    PyObject *d = PyFloat_FromDouble(duration);
    if (d == NULL) {
        Py_DECREF(a);
        return -1;
    }
    PyObject *args[5] = {r->probe, callback, owner != NULL ? owner : Py_None, a, d};
    PyObject *res = PyObject_VectorcallMethod(s_record_slow, args,
                                              5 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_DECREF(a);
    Py_DECREF(d);
    if (res == NULL)
        return -1;
    Py_DECREF(res);
    return 0;
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
            return lookup_optional(callback, s_self, owner);
        PyObject *descr = _PyType_Lookup(tp, s_self); /* borrowed */
        if (descr == NULL || !Py_IS_TYPE(descr, &PyGetSetDescr_Type) ||
            ((PyGetSetDescrObject *)descr)->d_getset->get == NULL)
            return lookup_optional(callback, s_self, owner);
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

/* LoopProbe.after_io.  Must be called with no exception set; -1 with one set on error. */
static int record_io(Recorder *r, PyObject *callback, double start, double end) {
    double duration = end > start ? end - start : 0.0;
    r->duration_counts[bucket_of(duration)]++;
    r->duration_total += duration;
    if (r->busy_from_callbacks)
        r->busy_seconds += duration;
    if (duration >= r->threshold)
        return record_slow(r, callback, NULL, start, duration);
    return 0;
}

/* LoopProbe.after_step.  Must be called with no exception set; -1 with one set on error. */
static int record(Recorder *r, PyObject *callback, double ready, double start, double end) {
    double duration = end > start ? end - start : 0.0;
    r->duration_counts[bucket_of(duration)]++;
    r->duration_total += duration;
    double delay = start - ready;
    if (delay < 0.0)
        delay = 0.0;
    r->delay_counts[bucket_of(delay)]++;
    r->delay_total += delay;
    if (r->busy_from_callbacks)
        r->busy_seconds += duration;

    PyObject *owner = NULL; /* new reference or NULL */
    if (owner_of(callback, &owner) < 0)
        return -1;
    if (owner == Py_None)
        Py_CLEAR(owner);
    if (owner != NULL) {
        int is_task = 0;
        PyObject *types = r->task_types;
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(types); i++) {
            if ((PyObject *)Py_TYPE(owner) == PyTuple_GET_ITEM(types, i)) {
                is_task = 1;
                break;
            }
        }
        if (!is_task)
            is_task = PyObject_IsInstance(owner, types);
        if (is_task < 0) {
            Py_DECREF(owner);
            return -1;
        }
        if (is_task)
            r->task_steps++;
        else
            Py_CLEAR(owner);
    }
    int rc = 0;
    if (duration >= r->threshold)
        rc = record_slow(r, callback, owner, start, duration);
    Py_XDECREF(owner);
    return rc;
}

/* probe.fault(exc) for the exception currently set; never leaves one set. */
static void report_fault(Recorder *r) {
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
    if (exc == NULL)
        return;
    PyObject *res = PyObject_CallMethodOneArg(r->probe, s_fault, exc);
    Py_DECREF(exc);
    if (res == NULL)
        PyErr_WriteUnraisable(r->probe);
    else
        Py_DECREF(res);
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
    self->native_clock = (clock == time_monotonic);
#ifdef _WIN32
    self->native_clock = 0;
#endif
    free_slot(self);
    if (self->native_clock) {
        self->slot = take_slot();
        if (self->slot >= 0)
            self->start = &start_slots[self->slot].start;
    }
    self->threshold = threshold;
    self->busy_from_callbacks = busy;
    return 0;
}

static int Recorder_traverse(Recorder *self, visitproc visit, void *arg) {
    Py_VISIT(self->probe);
    Py_VISIT(self->current_callback);
    Py_VISIT(self->clock);
    Py_VISIT(self->task_types);
    return 0;
}

static int Recorder_clear(Recorder *self) {
    Py_CLEAR(self->probe);
    Py_CLEAR(self->clock);
    Py_CLEAR(self->task_types);
    Py_CLEAR(self->current_callback);
    return 0;
}

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

static int ready_recorder(Recorder *r) {
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
    PyObject *list = PyObject_GetAttr(hist, s_counts);
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
    if (add_float_attr(hist, s_total, total) < 0)
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
    if (ready_recorder(self) < 0)
        return NULL;
    if (flush_histogram(stats, s_callback_duration, self->duration_counts,
                        &self->duration_total) < 0 ||
        flush_histogram(stats, s_schedule_delay, self->delay_counts, &self->delay_total) < 0 ||
        add_float_attr(stats, s_busy_seconds, &self->busy_seconds) < 0 ||
        add_int_attr(stats, s_task_steps, &self->task_steps) < 0 ||
        add_int_attr(stats, s_tasks_created, &self->tasks_created) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Recorder_record(Recorder *self, PyObject *const *args, Py_ssize_t nargs) {
    if (ready_recorder(self) < 0)
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
    if (record(self, args[0], v[0], v[1], v[2]) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Recorder_record_io(Recorder *self, PyObject *const *args, Py_ssize_t nargs) {
    if (ready_recorder(self) < 0)
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
    if (record_io(self, args[0], v[0], v[1]) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Recorder_now(Recorder *self, PyObject *Py_UNUSED(ignored)) {
    if (ready_recorder(self) < 0)
        return NULL;
    double t;
    if (read_clock(self, &t) < 0)
        return NULL;
    return PyFloat_FromDouble(t);
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
     "Fold the figures kept here into a LoopStats and reset them."},
    {"record", (PyCFunction)(void (*)(void))Recorder_record, METH_FASTCALL,
     "record(callback, ready, start, end): LoopProbe.after_step."},
    {"record_io", (PyCFunction)(void (*)(void))Recorder_record_io, METH_FASTCALL,
     "record_io(callback, start, end): LoopProbe.after_io."},
    {"now", (PyCFunction)Recorder_now, METH_NOARGS, "Read the recorder's clock."},
    {"pending", (PyCFunction)Recorder_pending, METH_NOARGS,
     "True if figures are waiting for flush()."},
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
    {"current_callback", (getter)Recorder_get_current_callback,
     (setter)Recorder_set_current_callback, "The callback of the step running now, or None.",
     NULL},
    {NULL}};

static PyMemberDef Recorder_members[] = {
    {"probe", T_OBJECT, offsetof(Recorder, probe), READONLY, NULL},
    {"threshold", T_DOUBLE, offsetof(Recorder, threshold), READONLY, NULL},
    {"busy_from_callbacks", T_INT, offsetof(Recorder, busy_from_callbacks), 0, NULL},
    {"native_clock", T_INT, offsetof(Recorder, native_clock), READONLY, NULL},
    {NULL}};

static PyTypeObject Recorder_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopscope._speedups.Recorder",
    .tp_basicsize = sizeof(Recorder),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Per-loop figures kept in C; folded into a LoopStats by flush().",
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
 * Wrapper: what TimedCallback and TimedIO share (their first fields, and the functions
 * that only look at those).
 */
#define WRAPPER_HEAD \
    PyObject_HEAD    \
    PyObject *callback; \
    Recorder *recorder;

typedef struct {
    WRAPPER_HEAD
} Wrapper;

static int Wrapper_traverse(Wrapper *self, visitproc visit, void *arg) {
    Py_VISIT(self->callback);
    Py_VISIT(self->recorder);
    return 0;
}

static int Wrapper_clear(Wrapper *self) {
    Py_CLEAR(self->callback);
    Py_CLEAR(self->recorder);
    return 0;
}

static PyObject *Wrapper_repr(Wrapper *self) {
    if (self->callback == NULL)
        return PyUnicode_FromFormat("<%s (cleared)>", Py_TYPE(self)->tp_name);
    return PyObject_Repr(self->callback);
}

static PyObject *Wrapper_get_probe(Wrapper *self, void *Py_UNUSED(closure)) {
    if (self->recorder == NULL || self->recorder->probe == NULL)
        Py_RETURN_NONE;
    return Py_NewRef(self->recorder->probe);
}

static PyGetSetDef Wrapper_getset[] = {
    {"probe", (getter)Wrapper_get_probe, NULL, NULL, NULL}, {NULL}};

/* ---------------------------------------------------------------------------------------
 * TimedCallback (uvloop)
 */
typedef struct {
    WRAPPER_HEAD
    double ready;
    vectorcallfunc vectorcall;
} TimedCallback;

static PyTypeObject TimedCallback_Type;

/* callback(*args): a callable without vectorcall (asyncio's C task step wrapper) called
 * with no arguments goes straight to its tp_call with the empty tuple, as uvloop's own
 * handles call it, rather than through the generic path that would build the tuple. */
static inline PyObject *call_callback(PyObject *callback, PyObject *const *args, size_t nargsf,
                                      PyObject *kwnames) {
    ternaryfunc call = Py_TYPE(callback)->tp_call;
    if (PyVectorcall_NARGS(nargsf) == 0 && kwnames == NULL && call != NULL &&
        PyVectorcall_Function(callback) == NULL) {
        if (Py_EnterRecursiveCall(" while calling a Python object"))
            return NULL;
        PyObject *result = call(callback, empty_tuple, NULL);
        Py_LeaveRecursiveCall();
        if (result == NULL && !PyErr_Occurred())
            PyErr_SetString(PyExc_SystemError, "a callback returned NULL without an exception");
        return result;
    }
    return PyObject_Vectorcall(callback, args, nargsf, kwnames);
}

static PyObject *TimedCallback_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf,
                                          PyObject *kwnames) {
    TimedCallback *self = (TimedCallback *)op;
    Recorder *r = self->recorder;
    double start, end;
    if (read_clock(r, &start) < 0) {
        report_fault(r);
        start = self->ready;
    }
    /* keep the callback alive for the bookkeeping even if it drops itself */
    PyObject *callback = Py_NewRef(self->callback);
    mark_start(r, callback, start);
    PyObject *result = call_callback(callback, args, nargsf, kwnames);
    /* finally: (the callback's exception, if any, is kept aside and restored) */
    saved_exc saved = {0};
    if (result == NULL)
        exc_save(&saved);
    mark_end(r);
    if (read_clock(r, &end) < 0 ||
        record(r, callback, self->ready, start, end) < 0)
        report_fault(r);
    if (result == NULL)
        exc_restore(&saved);
    Py_DECREF(callback);
    return result;
}

/* One TimedCallback is made and dropped per scheduled callback: keep a few dropped ones
 * for reuse, as CPython does for its own small objects (the GIL guards the list; builds
 * without a GIL or with reference tracing do without it). */
#if !defined(Py_GIL_DISABLED) && !defined(Py_TRACE_REFS)
#define TC_FREELIST 256
#else
#define TC_FREELIST 0
#endif
#if TC_FREELIST > 0
static TimedCallback *tc_free[TC_FREELIST];
static int tc_free_count;
#endif

static TimedCallback *TimedCallback_create(PyObject *callback, Recorder *recorder, double ready) {
    TimedCallback *self;
#if TC_FREELIST > 0
    if (tc_free_count > 0) {
        self = tc_free[--tc_free_count];
        PyObject_Init((PyObject *)self, &TimedCallback_Type);
    }
    else
#endif
    {
        self = PyObject_GC_New(TimedCallback, &TimedCallback_Type);
        if (self == NULL)
            return NULL;
    }
    self->callback = Py_NewRef(callback);
    self->recorder = (Recorder *)Py_NewRef((PyObject *)recorder);
    self->ready = ready;
    self->vectorcall = TimedCallback_vectorcall;
    PyObject_GC_Track(self);
    return self;
}

static PyObject *TimedCallback_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *callback, *recorder;
    double ready;
    static char *kwlist[] = {"callback", "recorder", "ready", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO!d:TimedCallback", kwlist, &callback,
                                     &Recorder_Type, &recorder, &ready))
        return NULL;
    if (ready_recorder((Recorder *)recorder) < 0)
        return NULL;
    return (PyObject *)TimedCallback_create(callback, (Recorder *)recorder, ready);
}

static void TimedCallback_dealloc(TimedCallback *self) {
    PyObject_GC_UnTrack(self);
    Wrapper_clear((Wrapper *)self);
#if TC_FREELIST > 0
    if (tc_free_count < TC_FREELIST && Py_IS_TYPE(self, &TimedCallback_Type)) {
        tc_free[tc_free_count++] = self;
        return;
    }
#endif
    PyObject_GC_Del(self);
}

static PyMemberDef TimedCallback_members[] = {
    {"callback", T_OBJECT, offsetof(TimedCallback, callback), READONLY, NULL},
    {"ready", T_DOUBLE, offsetof(TimedCallback, ready), READONLY, NULL},
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(TimedCallback, vectorcall), READONLY, NULL},
    {NULL}};

static PyTypeObject TimedCallback_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopscope._speedups.TimedCallback",
    .tp_basicsize = sizeof(TimedCallback),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "A callback that measures itself (uvloop); repr() is the callback's.",
    .tp_new = TimedCallback_new,
    .tp_dealloc = (destructor)TimedCallback_dealloc,
    .tp_traverse = (traverseproc)Wrapper_traverse,
    .tp_clear = (inquiry)Wrapper_clear,
    .tp_repr = (reprfunc)Wrapper_repr,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(TimedCallback, vectorcall),
    .tp_getset = Wrapper_getset,
    .tp_members = TimedCallback_members,
};

/* ---------------------------------------------------------------------------------------
 * TimedIO (uvloop): _uvloop_hooks.TimedIO in C.  Made once per reader, writer or protocol
 * method, called by libuv's callbacks; it has no schedule delay and is not a task step.
 */
typedef struct {
    WRAPPER_HEAD
    vectorcallfunc vectorcall;
} TimedIO;

static PyTypeObject TimedIO_Type;

/* Whether this call is measured: not when it runs inside a step that already is (a
 * protocol method called from a timed callback), nor once the probe is no longer active
 * (after uninstall() the protocol keeps its attributes). */
static int io_is_timed(Recorder *r) {
    if (load_start(r) != 0.0)
        return 0;
    PyObject *active = PyObject_GetAttr(r->probe, s_active);
    int timed = active == NULL ? -1 : PyObject_IsTrue(active);
    Py_XDECREF(active);
    if (timed < 0) {
        report_fault(r);
        return 0;
    }
    return timed;
}

static PyObject *TimedIO_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf,
                                    PyObject *kwnames) {
    TimedIO *self = (TimedIO *)op;
    Recorder *r = self->recorder;
    PyObject *callback = Py_NewRef(self->callback);
    double start, end;
    if (!io_is_timed(r) || read_clock(r, &start) < 0) {
        if (PyErr_Occurred())
            report_fault(r);
        PyObject *result = PyObject_Vectorcall(callback, args, nargsf, kwnames);
        Py_DECREF(callback);
        return result;
    }
    mark_start(r, callback, start);
    PyObject *result = PyObject_Vectorcall(callback, args, nargsf, kwnames);
    saved_exc saved = {0};
    if (result == NULL)
        exc_save(&saved);
    mark_end(r);
    if (read_clock(r, &end) < 0 || record_io(r, callback, start, end) < 0)
        report_fault(r);
    if (result == NULL)
        exc_restore(&saved);
    Py_DECREF(callback);
    return result;
}

static PyObject *TimedIO_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *callback, *recorder;
    static char *kwlist[] = {"callback", "recorder", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO!:TimedIO", kwlist, &callback,
                                     &Recorder_Type, &recorder))
        return NULL;
    if (ready_recorder((Recorder *)recorder) < 0)
        return NULL;
    TimedIO *self = (TimedIO *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->callback = Py_NewRef(callback);
    self->recorder = (Recorder *)Py_NewRef(recorder);
    self->vectorcall = TimedIO_vectorcall;
    return (PyObject *)self;
}

static void TimedIO_dealloc(TimedIO *self) {
    PyObject_GC_UnTrack(self);
    Wrapper_clear((Wrapper *)self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef TimedIO_members[] = {
    {"callback", T_OBJECT, offsetof(TimedIO, callback), READONLY, NULL},
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(TimedIO, vectorcall), READONLY, NULL},
    {NULL}};

static PyTypeObject TimedIO_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopscope._speedups.TimedIO",
    .tp_basicsize = sizeof(TimedIO),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "An I/O callback that measures itself (uvloop); repr() is the callback's.",
    .tp_new = TimedIO_new,
    .tp_dealloc = (destructor)TimedIO_dealloc,
    .tp_traverse = (traverseproc)Wrapper_traverse,
    .tp_clear = (inquiry)Wrapper_clear,
    .tp_repr = (reprfunc)Wrapper_repr,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(TimedIO, vectorcall),
    .tp_getset = Wrapper_getset,
    .tp_members = TimedIO_members,
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
                                     &Recorder_Type, &recorder))
        return NULL;
    CreateTask *self = (CreateTask *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = CreateTask_vectorcall;
    self->create = Py_NewRef(create);
    self->recorder = (Recorder *)Py_NewRef(recorder);
    return (PyObject *)self;
}

static int CreateTask_traverse(CreateTask *self, visitproc visit, void *arg) {
    Py_VISIT(self->create);
    Py_VISIT(self->recorder);
    return 0;
}

static int CreateTask_clear(CreateTask *self) {
    Py_CLEAR(self->create);
    Py_CLEAR(self->recorder);
    return 0;
}

static void CreateTask_dealloc(CreateTask *self) {
    PyObject_GC_UnTrack(self);
    CreateTask_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *CreateTask_repr(CreateTask *self) {
    if (self->create == NULL)
        return PyUnicode_FromString("<CreateTask (cleared)>");
    return PyObject_Repr(self->create);
}

static PyMemberDef CreateTask_members[] = {
    {"create_task", T_OBJECT, offsetof(CreateTask, create), READONLY, NULL},
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(CreateTask, vectorcall), READONLY, NULL},
    {NULL}};

static PyTypeObject CreateTask_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopscope._speedups.CreateTask",
    .tp_basicsize = sizeof(CreateTask),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "The loop's create_task, counting the tasks it creates; repr() is the loop's.",
    .tp_new = CreateTask_new,
    .tp_dealloc = (destructor)CreateTask_dealloc,
    .tp_traverse = (traverseproc)CreateTask_traverse,
    .tp_clear = (inquiry)CreateTask_clear,
    .tp_repr = (reprfunc)CreateTask_repr,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(CreateTask, vectorcall),
    .tp_members = CreateTask_members,
};

/* ---------------------------------------------------------------------------------------
 * Intercept (uvloop's call_soon, call_soon_threadsafe, call_later)
 */
enum { KIND_SOON = 0, KIND_LATER = 1 };

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

static PyObject *Intercept_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf,
                                      PyObject *kwnames) {
    Intercept *self = (Intercept *)op;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    Py_ssize_t cb_index = self->kind == KIND_SOON ? 0 : 1;
    double ready;
    if (nargs <= cb_index || nargs + nkw > STACK_ARGS || nkw > 1)
        goto fallback;
    if (nkw == 1) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, 0);
        if (name != s_context && name != seen_context) {
            if (!PyUnicode_CheckExact(name) || PyUnicode_Compare(name, s_context) != 0)
                goto fallback;
            Py_INCREF(name);
            Py_XSETREF(seen_context, name);
        }
    }
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
        TimedCallback *wrapped = TimedCallback_create(args[cb_index], self->recorder, ready);
        if (wrapped == NULL)
            return NULL;
        /* stack[0] is free for the callee (PY_VECTORCALL_ARGUMENTS_OFFSET); a bound method
         * is called as its function with the loop first, as asyncio's C task calls the
         * loop's method when nothing shadows it (no method object in between). */
        PyObject *stack[STACK_ARGS + 2];
        PyObject **call = stack + 1;
        Py_ssize_t first = 0;
        if (self->bound != NULL)
            call[first++] = self->bound;
        for (Py_ssize_t i = 0; i < nargs + nkw; i++)
            call[first + i] = args[i];
        call[first + cb_index] = (PyObject *)wrapped;
        PyObject *result = PyObject_Vectorcall(
            self->function, call, (size_t)(first + nargs) | PY_VECTORCALL_ARGUMENTS_OFFSET,
            kwnames);
        Py_DECREF(wrapped);
        return result;
    }
fallback:
    return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
}

static PyObject *Intercept_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"kind", "recorder", "original", "fallback", "loop_time", NULL};
    const char *kind;
    PyObject *recorder, *original, *fallback, *loop_time = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "sO!OO|O:Intercept", kwlist, &kind,
                                     &Recorder_Type, &recorder, &original, &fallback,
                                     &loop_time))
        return NULL;
    int k;
    if (strcmp(kind, "call_soon") == 0)
        k = KIND_SOON;
    else if (strcmp(kind, "call_later") == 0)
        k = KIND_LATER;
    else {
        PyErr_SetString(PyExc_ValueError, "kind must be 'call_soon' or 'call_later'");
        return NULL;
    }
    if (k == KIND_LATER && !PyCallable_Check(loop_time)) {
        PyErr_SetString(PyExc_TypeError, "call_later needs loop_time");
        return NULL;
    }
    if (ready_recorder((Recorder *)recorder) < 0)
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

static int Intercept_traverse(Intercept *self, visitproc visit, void *arg) {
    Py_VISIT(self->recorder);
    Py_VISIT(self->original);
    Py_VISIT(self->function);
    Py_VISIT(self->bound);
    Py_VISIT(self->fallback);
    Py_VISIT(self->loop_time);
    return 0;
}

static int Intercept_clear(Intercept *self) {
    Py_CLEAR(self->recorder);
    Py_CLEAR(self->original);
    Py_CLEAR(self->function);
    Py_CLEAR(self->bound);
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->loop_time);
    return 0;
}

static void Intercept_dealloc(Intercept *self) {
    PyObject_GC_UnTrack(self);
    Intercept_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Intercept_repr(Intercept *self) {
    return PyUnicode_FromFormat("<loopscope %s of %R>",
                                self->kind == KIND_SOON ? "call_soon" : "call_later",
                                self->original);
}

static PyMemberDef Intercept_members[] = {
    {"original", T_OBJECT, offsetof(Intercept, original), READONLY, NULL},
    {"fallback", T_OBJECT, offsetof(Intercept, fallback), READONLY, NULL},
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(Intercept, vectorcall), READONLY, NULL},
    {NULL}};

static PyTypeObject Intercept_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopscope._speedups.Intercept",
    .tp_basicsize = sizeof(Intercept),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "uvloop's call_soon/call_soon_threadsafe/call_later, wrapping the callback.",
    .tp_new = Intercept_new,
    .tp_dealloc = (destructor)Intercept_dealloc,
    .tp_traverse = (traverseproc)Intercept_traverse,
    .tp_clear = (inquiry)Intercept_clear,
    .tp_repr = (reprfunc)Intercept_repr,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Intercept, vectorcall),
    .tp_members = Intercept_members,
};

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
    /* No "del handle._source_traceback[-1]" here: the pure-Python _call_soon removes its
     * own frame from the debug-mode stack, and this one has no frame. */
    PyObject *res = PyObject_CallOneArg(self->append, handle);
    if (res == NULL)
        goto error;
    Py_DECREF(res);
    return handle;
error:
    Py_DECREF(handle);
    return NULL;
}

static PyObject *CallSoon_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"recorder", "handle_class", "loop", "append", "ready_attr",
                             "fallback", NULL};
    PyObject *recorder, *handle_class, *loop, *append, *ready_attr, *fallback;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!OOOUO:CallSoon", kwlist, &Recorder_Type,
                                     &recorder, &handle_class, &loop, &append, &ready_attr,
                                     &fallback))
        return NULL;
    if (ready_recorder((Recorder *)recorder) < 0)
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
    self->ready_offset = -1;
    if (PyType_Check(handle_class))
        self->ready_offset = slot_offset((PyTypeObject *)handle_class, ready_attr);
    return (PyObject *)self;
}

static int CallSoon_traverse(CallSoon *self, visitproc visit, void *arg) {
    Py_VISIT(self->recorder);
    Py_VISIT(self->handle_class);
    Py_VISIT(self->loop);
    Py_VISIT(self->append);
    Py_VISIT(self->fallback);
    return 0;
}

static int CallSoon_clear(CallSoon *self) {
    Py_CLEAR(self->recorder);
    Py_CLEAR(self->handle_class);
    Py_CLEAR(self->loop);
    Py_CLEAR(self->append);
    Py_CLEAR(self->ready_attr);
    Py_CLEAR(self->fallback);
    return 0;
}

static void CallSoon_dealloc(CallSoon *self) {
    PyObject_GC_UnTrack(self);
    CallSoon_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef CallSoon_members[] = {
    {"fallback", T_OBJECT, offsetof(CallSoon, fallback), READONLY, NULL},
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(CallSoon, vectorcall), READONLY, NULL},
    {NULL}};

static PyTypeObject CallSoon_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopscope._speedups.CallSoon",
    .tp_basicsize = sizeof(CallSoon),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "asyncio's loop._call_soon, making timed handles.",
    .tp_new = CallSoon_new,
    .tp_dealloc = (destructor)CallSoon_dealloc,
    .tp_traverse = (traverseproc)CallSoon_traverse,
    .tp_clear = (inquiry)CallSoon_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(CallSoon, vectorcall),
    .tp_members = CallSoon_members,
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
    Py_ssize_t callback_offset, ready_offset, context_offset, args_offset;
    PyObject *report; /* report(handle, exc): asyncio's own except block, or NULL */
} TimedRun;

#define RUN_STACK 8

/* events.Handle._run: self._context.run(self._callback, *self._args).  An exception other
 * than SystemExit/KeyboardInterrupt is handed to report(), which replays it through
 * asyncio's own Handle._run so the loop's exception handler gets what it always gets. */
static PyObject *run_handle(TimedRun *self, PyObject *handle) {
    if (self->report == NULL || Py_TYPE(handle) != self->cls || self->context_offset < 0 ||
        self->args_offset < 0 || self->callback_offset < 0)
        return PyObject_Vectorcall(self->handle_run, &handle, 1, NULL);
    PyObject *context = *(PyObject **)((char *)handle + self->context_offset);
    PyObject *callback = *(PyObject **)((char *)handle + self->callback_offset);
    PyObject *cargs = *(PyObject **)((char *)handle + self->args_offset);
    if (context == NULL || callback == NULL || cargs == NULL || !PyTuple_CheckExact(cargs) ||
        PyTuple_GET_SIZE(cargs) > RUN_STACK - 3)
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
    PyObject *result = PyObject_VectorcallMethod(
        s_run, stack + 1, (size_t)(2 + n) | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_DECREF(context);
    Py_DECREF(callback);
    Py_DECREF(cargs);
    if (result != NULL) {
        Py_DECREF(result);
        Py_RETURN_NONE;
    }
    if (PyErr_ExceptionMatches(PyExc_SystemExit) ||
        PyErr_ExceptionMatches(PyExc_KeyboardInterrupt))
        return NULL;
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
    if (exc == NULL)
        return NULL;
    PyObject *report_args[2] = {handle, exc};
    PyObject *reported = PyObject_Vectorcall(self->report, report_args, 2, NULL);
    Py_DECREF(exc);
    return reported;
}

static PyObject *TimedRun_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf,
                                     PyObject *kwnames) {
    TimedRun *self = (TimedRun *)op;
    if (PyVectorcall_NARGS(nargsf) != 1 || kwnames != NULL)
        return PyObject_Vectorcall(self->handle_run, args, nargsf, kwnames);
    Recorder *r = self->recorder;
    PyObject *handle = args[0];
    double start, end;
    if (read_clock(r, &start) < 0)
        return NULL;
    PyObject *callback = get_slot(handle, self->cls, self->callback_offset, s_callback);
    if (callback == NULL)
        return NULL;
    mark_start(r, callback, start);
    PyObject *result = run_handle(self, handle);
    if (result == NULL) {
        /* SystemExit / KeyboardInterrupt: nothing is recorded (the pure path stops there
         * too), but the step is over: a marker left set would make the watchdog report an
         * idle loop as blocked from then on. */
        mark_end(r);
        Py_DECREF(callback);
        return NULL;
    }
    mark_end(r);
    /* try: probe.after_step(...) except Exception as exc: probe.fault(exc) */
    Py_DECREF(callback);
    callback = get_slot(handle, self->cls, self->callback_offset, s_callback);
    int rc = -1;
    if (callback != NULL && read_clock(r, &end) == 0) {
        if (self->ready_attr == NULL)
            rc = record_io(r, callback, start, end);
        else {
            PyObject *ready_obj =
                get_slot(handle, self->cls, self->ready_offset, self->ready_attr);
            if (ready_obj != NULL) {
                double ready = PyFloat_AsDouble(ready_obj);
                Py_DECREF(ready_obj);
                if (!(ready == -1.0 && PyErr_Occurred()))
                    rc = record(r, callback, ready, start, end);
            }
        }
    }
    Py_XDECREF(callback);
    if (rc < 0) {
        if (!PyErr_ExceptionMatches(PyExc_Exception)) {
            Py_DECREF(result);
            return NULL;
        }
        report_fault(r);
    }
    return result;
}

static PyObject *TimedRun_descr_get(PyObject *self, PyObject *obj, PyObject *type) {
    if (obj == NULL || obj == Py_None)
        return Py_NewRef(self);
    return PyMethod_New(self, obj);
}

static PyObject *TimedRun_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"recorder", "handle_run", "ready_attr", "cls", "report", NULL};
    PyObject *recorder, *handle_run, *ready_attr, *cls = Py_None, *report = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!OO|OO:TimedRun", kwlist, &Recorder_Type,
                                     &recorder, &handle_run, &ready_attr, &cls, &report))
        return NULL;
    if (cls != Py_None && !PyType_Check(cls)) {
        PyErr_SetString(PyExc_TypeError, "cls must be a type or None");
        return NULL;
    }
    if (ready_attr != Py_None && !PyUnicode_Check(ready_attr)) {
        PyErr_SetString(PyExc_TypeError, "ready_attr must be a str, or None for I/O handles");
        return NULL;
    }
    if (ready_recorder((Recorder *)recorder) < 0)
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
    if (report != Py_None)
        self->report = Py_NewRef(report);
    if (cls != Py_None) {
        self->cls = (PyTypeObject *)Py_NewRef(cls);
        self->callback_offset = slot_offset(self->cls, s_callback);
        self->context_offset = slot_offset(self->cls, s_context_slot);
        self->args_offset = slot_offset(self->cls, s_args);
        if (self->ready_attr != NULL)
            self->ready_offset = slot_offset(self->cls, self->ready_attr);
    }
    return (PyObject *)self;
}

static int TimedRun_traverse(TimedRun *self, visitproc visit, void *arg) {
    Py_VISIT(self->recorder);
    Py_VISIT(self->handle_run);
    Py_VISIT(self->cls);
    Py_VISIT(self->report);
    return 0;
}

static int TimedRun_clear(TimedRun *self) {
    Py_CLEAR(self->recorder);
    Py_CLEAR(self->handle_run);
    Py_CLEAR(self->ready_attr);
    Py_CLEAR(self->cls);
    Py_CLEAR(self->report);
    return 0;
}

static void TimedRun_dealloc(TimedRun *self) {
    PyObject_GC_UnTrack(self);
    TimedRun_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef TimedRun_members[] = {
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(TimedRun, vectorcall), READONLY, NULL},
    {NULL}};

static PyTypeObject TimedRun_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopscope._speedups.TimedRun",
    .tp_basicsize = sizeof(TimedRun),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
                Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_doc = "Handle._run that times the handle (asyncio's loop).",
    .tp_new = TimedRun_new,
    .tp_dealloc = (destructor)TimedRun_dealloc,
    .tp_traverse = (traverseproc)TimedRun_traverse,
    .tp_clear = (inquiry)TimedRun_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(TimedRun, vectorcall),
    .tp_descr_get = TimedRun_descr_get,
    .tp_members = TimedRun_members,
};

/* ---------------------------------------------------------------------------------------
 * module
 */
static int intern(PyObject **slot, const char *text) {
    *slot = PyUnicode_InternFromString(text);
    return *slot == NULL ? -1 : 0;
}

/* ---------------------------------------------------------------------------------------
 * watch_steps: the watchdog's wait, without the GIL
 */

/* The watchdog's wake-up call: a condition variable rather than a pipe, so that loopscope
 * holds no file descriptor an application could close or reuse.  Re-made in a child
 * after fork (a parent's thread may have held the mutex). */
static pthread_mutex_t watch_mutex;
static pthread_cond_t watch_cond;
static unsigned long watch_wakes; /* guarded by watch_mutex */

static int watch_init(void) {
    pthread_condattr_t attr;
    if (pthread_mutex_init(&watch_mutex, NULL) != 0 || pthread_condattr_init(&attr) != 0)
        return -1;
#if !defined(__APPLE__)
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
#endif
    int rc = pthread_cond_init(&watch_cond, &attr);
    pthread_condattr_destroy(&attr);
    return rc == 0 ? 0 : -1;
}

static void watch_after_fork(void) {
    (void)watch_init();
    watch_wakes = 0;
}

/* Wait on watch_cond until `seconds` pass or wake_watchers() is called after `seen`;
 * returns whether it was called.  With watch_mutex held. */
static int watch_sleep(double seconds, unsigned long seen) {
    struct timespec until;
#if defined(__APPLE__)
    clock_gettime(CLOCK_REALTIME, &until);
#else
    clock_gettime(CLOCK_MONOTONIC, &until);
#endif
    long long ns = (long long)until.tv_nsec + (long long)(seconds * 1e9);
    until.tv_sec += (time_t)(ns / 1000000000LL);
    until.tv_nsec = (long)(ns % 1000000000LL);
    while (watch_wakes == seen) {
        if (pthread_cond_timedwait(&watch_cond, &watch_mutex, &until) == ETIMEDOUT)
            break;
    }
    return watch_wakes != seen;
}

/* watch_steps(sample_after, interval, timeout) -> bool
 *
 * The watchdog thread's sleep between its checks.  Every `interval` it reads the start
 * slots of the recorders on the native clock (without the GIL) and returns True as soon as
 * one step has run for `sample_after` seconds; it returns False when wake_watchers() is
 * called or after `timeout` seconds.  A Python thread that woke every interval would take
 * the GIL each time; with a loop that drops and retakes the GIL on every iteration
 * (uvloop around libuv, asyncio around select), its waits for the GIL cost the watchdog
 * about 8% of a CPU and the loop a futex wake per iteration. */
static PyObject *watch_steps(PyObject *Py_UNUSED(module), PyObject *const *args,
                             Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "watch_steps() takes 3 arguments");
        return NULL;
    }
    double sample_after = PyFloat_AsDouble(args[0]);
    double interval = PyFloat_AsDouble(args[1]);
    double timeout = PyFloat_AsDouble(args[2]);
    if (PyErr_Occurred())
        return NULL;
    if (!(interval > 0.0 && interval <= 3600.0 && sample_after >= 0.0 && timeout >= 0.0)) {
        PyErr_SetString(PyExc_ValueError,
                        "watch_steps(): interval must be in (0, 3600] seconds, the others "
                        "not negative");
        return NULL;
    }
    int long_step = 0;
    Py_BEGIN_ALLOW_THREADS
    double deadline = clock_gettime_seconds() + timeout;
    pthread_mutex_lock(&watch_mutex);
    unsigned long seen = watch_wakes;
    for (;;) {
        if (watch_sleep(interval, seen))
            break;
        double now = clock_gettime_seconds();
#if defined(__GNUC__) || defined(__clang__)
        int high = __atomic_load_n(&slots_high, __ATOMIC_ACQUIRE);
#else
        int high = slots_high;
#endif
        for (int i = 0; i < high && !long_step; i++) {
            double start = load_double(&start_slots[i].start);
            long_step = start != 0.0 && now - start >= sample_after;
        }
        if (long_step || now >= deadline)
            break;
    }
    pthread_mutex_unlock(&watch_mutex);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(long_step);
}

/* wake_watchers(): every watch_steps() waiting now returns. */
static PyObject *wake_watchers(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored)) {
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&watch_mutex);
    watch_wakes++;
    pthread_cond_broadcast(&watch_cond);
    pthread_mutex_unlock(&watch_mutex);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef speedups_methods[] = {
    {"watch_steps", (PyCFunction)(void (*)(void))watch_steps, METH_FASTCALL,
     "watch_steps(sample_after, interval, timeout): the watchdog's wait between checks, "
     "without the GIL; True when a step has run for sample_after."},
    {"wake_watchers", wake_watchers, METH_NOARGS,
     "Make every watch_steps() waiting now return False."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "loopscope._speedups",
    .m_doc = "C accelerator for loopscope's per-callback hot path (optional).",
    .m_size = -1,
    .m_methods = speedups_methods,
};

PyMODINIT_FUNC PyInit__speedups(void) {
    if (intern(&s_callback_duration, "callback_duration") < 0 ||
        intern(&s_schedule_delay, "schedule_delay") < 0 || intern(&s_counts, "counts") < 0 ||
        intern(&s_total, "total") < 0 || intern(&s_busy_seconds, "busy_seconds") < 0 ||
        intern(&s_task_steps, "task_steps") < 0 ||
        intern(&s_tasks_created, "tasks_created") < 0 || intern(&s_self, "__self__") < 0 ||
        intern(&s_callback, "_callback") < 0 ||
        intern(&s_fault, "fault") < 0 || intern(&s_context, "context") < 0 ||
        intern(&s_record_slow, "record_slow") < 0 || intern(&s_active, "active") < 0 ||
        intern(&s_context_slot, "_context") < 0 || intern(&s_args, "_args") < 0 ||
        intern(&s_run, "run") < 0)
        return NULL;
    empty_tuple = PyTuple_New(0);
    if (empty_tuple == NULL)
        return NULL;
    PyObject *time_module = PyImport_ImportModule("time");
    if (time_module == NULL)
        return NULL;
    time_monotonic = PyObject_GetAttrString(time_module, "monotonic");
    Py_DECREF(time_module);
    if (time_monotonic == NULL)
        return NULL;

    PyTypeObject *types[] = {&Recorder_Type, &TimedCallback_Type, &TimedIO_Type,
                             &Intercept_Type, &CallSoon_Type, &TimedRun_Type, &Engine_Type,
                             &CreateTask_Type};
    const char *names[] = {"Recorder", "TimedCallback", "TimedIO", "Intercept", "CallSoon",
                           "TimedRun", "Engine", "CreateTask"};
    fast_clock_init();
    if (watch_init() < 0 || pthread_atfork(NULL, NULL, watch_after_fork) != 0) {
        PyErr_SetString(PyExc_OSError, "cannot set up the watchdog's condition variable");
        return NULL;
    }
    if (fill_bucket_start() < 0)
        return NULL;
    PyObject *module = PyModule_Create(&speedups_module);
    if (module == NULL)
        return NULL;
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
        if (PyType_Ready(types[i]) < 0 ||
            PyModule_AddObjectRef(module, names[i], (PyObject *)types[i]) < 0) {
            Py_DECREF(module);
            return NULL;
        }
    }
    if (PyModule_AddFunctions(module, clock_methods) < 0 ||
        PyModule_AddIntConstant(module, "NBUCKETS", NBUCKETS) < 0 ||
        PyModule_AddIntConstant(module, "INTERFACE", SPEEDUPS_INTERFACE) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
