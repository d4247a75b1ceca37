/*
 * loopscope._speedups: the per-callback hot path in C.  What the files of the module share.
 *
 * Optional: loopscope works without it (the pure-Python hooks), and LOOPSCOPE_PURE_PYTHON=1
 * forces the pure path.  What is here mirrors, step for step, the pure-Python code:
 *
 *   Recorder       LoopProbe.after_step: the two histograms, busy time, task steps and the
 *                  slow-step counters, kept as C numbers and folded into the probe's
 *                  LoopStats by flush() (called under the series book's lock at scrape time
 *                  and when a loop's figures are retired).  The slow path (the structlog
 *                  event) calls back into Python exactly as the pure path does.  (recorder.c)
 *   TimedCallback  uvloop: the wrapper around each scheduled callback (repr delegates).
 *   Intercept      uvloop: the loop's call_soon / call_soon_threadsafe / call_later;
 *                  anything unusual is handed to the pure-Python function, so argument
 *                  errors are the same.  (uvloop_hooks.c)
 *   TimedIO        uvloop: the wrapper around reader/writer callbacks and protocol methods
 *                  (timed_io.c; what it shares with TimedCallback is wrapper.h).
 *   CallSoon       asyncio: the loop's _call_soon instance attribute.
 *   TimedRun       asyncio: the _run method of the per-loop Handle/TimerHandle subclasses.
 *   TimedPoller    asyncio: stands in for the poller of the loop's selector (select.epoll,
 *                  ...) and counts the seconds waited in it, for busy time.
 *                  (asyncio_hooks.c)
 *   CreateTask     both loops: the loop's create_task, counting tasks; RunForever, its
 *                  run_forever between the probe's start and stop.  (recorder.c)
 *   ClassHook      a replaced method on the class made for one uvloop loop
 *                  (_own_class.py), a method descriptor (classhook.c).
 *   Engine         the /metrics endpoint's socket work, without the GIL (endpoint.c).
 *   watch_steps    the watchdog thread's wait between checks, without the GIL (watch.c).
 *   clock_*        the native clock (clock.c): time.monotonic() from the CPU's counter.
 *   gil_reader     a submodule: the stacks of loop threads holding the GIL in one long C
 *                  call, read by a thread of its own while the call lasts (gilreader.c).
 *
 * The timed call that TimedCallback, TimedIO and TimedRun share is timed.h; the module's
 * init (interned names, the bucket bounds, the types) is module.c.
 *
 * Every object runs with the GIL held and never releases it, so a flush from a scrape
 * thread and the loop thread's updates cannot interleave; watch_steps only reads the step
 * start slots while it is without the GIL.
 *
 * Symbols one file uses from another are prefixed ls_ and hidden (LS_HIDDEN); everything
 * else is static to its file.
 */
#ifndef LOOPSCOPE_SPEEDUPS_H
#define LOOPSCOPE_SPEEDUPS_H

#include "compat.h"
#include "clock.h"

#include <stdint.h>
#include <string.h>

#define NBUCKETS 20 /* 19 bounds + the +Inf slot */
/* What the Python side expects of this module (_probe.SPEEDUPS_INTERFACE): raised whenever
 * the two change together, so that a module built from older sources is not used. */
#define SPEEDUPS_INTERFACE 9

/* Interned attribute names, created at module init (module.c). */
typedef struct {
    PyObject *callback_duration, *schedule_delay, *counts, *total;
    PyObject *busy_seconds, *task_steps, *tasks_created;
    PyObject *self;         /* "__self__" */
    PyObject *callback;     /* "_callback" */
    PyObject *fault, *context, *record_slow, *active;
    PyObject *offer_exemplar;
    PyObject *context_slot; /* "_context" */
    PyObject *args;         /* "_args" */
    PyObject *run;
    PyObject *poll, *control; /* the poller's wait methods (TimedPoller) */
    PyObject *source_traceback; /* "_source_traceback" */
} ls_names;

LS_HIDDEN extern ls_names ls_str;
LS_HIDDEN extern PyObject *ls_empty_tuple;

/* ---------------------------------------------------------------------------------------
 * Recorder (recorder.c)
 */
typedef struct {
    PyObject_HEAD
    PyObject *probe;
    PyObject *clock;       /* the probe's clock callable */
    PyObject *task_types;  /* tuple of task classes */
    /* asyncio's C task step wrapper, once a step of a task of task_types has been seen
     * through it (see ls_record), or NULL */
    PyTypeObject *step_type;
    /* The watchdog's step markers (see mark_start): read by the watchdog thread through
     * the current_start / current_callback attributes with the GIL held.  The start lives
     * at *start: a start slot (watch.c) that watch_steps() reads without the GIL, or
     * own_start for a recorder on another clock or when every slot is taken. */
    double *start;
    double own_start;
    /* The end of the last step that a next one may start at (timed.h's may_chain), 0.0
     * once anything else measured has run, the loop has stopped or started, or a
     * heartbeat has run. */
    double chain_end;
    int slot;              /* index of the start slot, or -1 */
    PyObject *current_callback; /* strong reference while a step runs, else NULL */
    int native_clock;      /* clock is time.monotonic: read it here */
    int busy_from_callbacks;
    double threshold;
    /* Task steps at or over exemplar_floor (and under threshold) are offered to
     * probe.offer_exemplar(); floor is the lower of the two, the one compare per step. */
    double exemplar_floor;
    double floor;
    /* figures not yet folded into the probe's LoopStats */
    unsigned long long duration_counts[NBUCKETS];
    unsigned long long delay_counts[NBUCKETS];
    double duration_total, delay_total, busy_seconds;
    unsigned long long task_steps;
    unsigned long long tasks_created;
} Recorder;

LS_HIDDEN extern PyTypeObject ls_Recorder_Type;

/* -1 with RuntimeError set if the recorder was never initialised. */
LS_HIDDEN int ls_ready_recorder(Recorder *r);
/* The histograms' bounds (loopscope._stats.BUCKETS) and bucket_of's table, filled at module
 * init (recorder.c). */
LS_HIDDEN extern double ls_buckets[NBUCKETS - 1];
LS_HIDDEN extern unsigned char ls_bucket_start[2048];

/* bisect_left(BUCKETS, value): the first bound >= value.  The value's binary exponent (the
 * exponent field of the double) picks the first bound at or above its power of two
 * (ls_bucket_start); no two bounds share a power of two (each is at least twice the one
 * before), so at most one more comparison finishes the search. */
static inline Py_ssize_t bucket_of(double value) {
    if (!(value > ls_buckets[0])) /* also 0, negatives and NaN, as bisect_left puts them */
        return 0;
    if (!(value <= ls_buckets[NBUCKETS - 2]))
        return NBUCKETS - 1;
    uint64_t bits;
    memcpy(&bits, &value, sizeof(bits));
    Py_ssize_t i = ls_bucket_start[(bits >> 52) & 0x7ff]; /* 2**e <= value < 2**(e+1) */
    if (ls_buckets[i] < value)
        i++;
    return i;
}

/* What ls_record does past the figures every step updates: tell a task step apart (and
 * count it, unless it is of r->step_type, which ls_record counted), and hand a step at or
 * over the floor to the probe.  -1 with an exception set on error. */
LS_HIDDEN int ls_record_owner(Recorder *r, PyObject *callback, double start, double duration);

/* LoopProbe.after_step, inlined in each wrapper: a step of asyncio's C task under the
 * floor (the most common step) takes no call.  Must be called with no exception set; -1
 * with one set on error. */
static inline int ls_record(Recorder *r, PyObject *callback, double ready, double start,
                            double end) {
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
    if (Py_TYPE(callback) == r->step_type) {
        r->task_steps++;
        if (duration < r->floor)
            return 0;
    }
    return ls_record_owner(r, callback, start, duration);
}

/* LoopProbe.after_io.  As ls_record. */
LS_HIDDEN int ls_record_io(Recorder *r, PyObject *callback, double start, double end);
/* probe.fault(exc) for the exception currently set; never leaves one set. */
LS_HIDDEN void ls_report_fault(Recorder *r);
/* At module init: the bucket bounds (loopscope._stats.BUCKETS: NBUCKETS - 1 finite
 * positive floats, each at least twice the one before) and time.monotonic.  -1 with an
 * exception set (ImportError for bounds the bucket search cannot use). */
LS_HIDDEN int ls_recorder_init(PyObject *bounds);

/* The clock as a C double; -1 with an exception set on failure. */
static inline int read_clock(Recorder *r, double *out) {
    if (LS_LIKELY(r->native_clock)) {
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

/* ---------------------------------------------------------------------------------------
 * The step start slots (watch.c): one per recorder on the native clock, read by
 * watch_steps() without the GIL.  Stored and loaded as relaxed atomics (a plain move on
 * x86-64 and arm64).
 */
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

/* A free slot (its start set to 0.0), or -1 when every one is taken; with the GIL. */
LS_HIDDEN int ls_take_slot(void);
/* Where slot `i`'s start lives. */
LS_HIDDEN double *ls_slot_start(int i);
/* Give slot `i` back (its start set to 0.0); with the GIL. */
LS_HIDDEN void ls_free_slot(int i);

/* The GIL reader (sentinel.c): the watchdog arms it when it is about to want the GIL
 * (`wait` seconds from now) and disarms it when it waits without the GIL again; free when
 * no loop is registered. */
LS_HIDDEN void ls_gil_arm(double wait);
LS_HIDDEN void ls_gil_disarm(void);
/* The module loopscope._speedups.gil_reader (a new reference, or NULL). */
LS_HIDDEN PyObject *ls_gil_reader_module(void);

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

/* ---------------------------------------------------------------------------------------
 * What the types share (module.c)
 */

/* The object fields of a type are listed once, as FIELDS(X) applying X to each field;
 * LS_GC_FUNCTIONS(Type, FIELDS) defines Type_traverse and Type_clear from that list. */
#define LS_VISIT_FIELD(field) Py_VISIT(self->field);
#define LS_CLEAR_FIELD(field) Py_CLEAR(self->field);
#define LS_GC_FUNCTIONS(Type, FIELDS)                                                       \
    static int Type##_traverse(Type *self, visitproc visit, void *arg) {                    \
        FIELDS(LS_VISIT_FIELD)                                                              \
        return 0;                                                                           \
    }                                                                                       \
    static int Type##_clear(Type *self) {                                                   \
        FIELDS(LS_CLEAR_FIELD)                                                              \
        return 0;                                                                           \
    }

/* tp_dealloc of a GC type whose tp_clear lets go of everything it holds. */
LS_HIDDEN void ls_gc_dealloc(PyObject *self);

/* The callable types (their instances carry their vectorcall function in a `vectorcall`
 * field): the PyTypeObject fields they share, and their __vectorcalloffset__ member. */
#define LS_CALLABLE_TYPE(Type, extra_flags)                                                 \
    PyVarObject_HEAD_INIT(NULL, 0)                                                          \
    .tp_name = "loopscope._speedups." #Type,                                                \
    .tp_basicsize = sizeof(Type),                                                           \
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |      \
                (extra_flags),                                                              \
    .tp_new = Type##_new,                                                                   \
    .tp_traverse = (traverseproc)Type##_traverse,                                           \
    .tp_clear = (inquiry)Type##_clear,                                                      \
    .tp_call = PyVectorcall_Call,                                                           \
    .tp_vectorcall_offset = offsetof(Type, vectorcall)

#define LS_VECTORCALL_MEMBER(Type)                                                          \
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(Type, vectorcall), READONLY, NULL}

/* ---------------------------------------------------------------------------------------
 * The types and module functions of the other files
 */
LS_HIDDEN extern PyTypeObject ls_CreateTask_Type;    /* recorder.c */
LS_HIDDEN extern PyTypeObject ls_RunForever_Type;
LS_HIDDEN extern PyTypeObject ls_TimedCallback_Type; /* uvloop_hooks.c */
LS_HIDDEN extern PyTypeObject ls_Intercept_Type;
LS_HIDDEN extern PyTypeObject ls_TimedIO_Type;       /* timed_io.c */
LS_HIDDEN extern PyTypeObject ls_ClassHook_Type;     /* classhook.c */
LS_HIDDEN extern PyTypeObject ls_CallSoon_Type;      /* asyncio_hooks.c */
LS_HIDDEN extern PyTypeObject ls_TimedRun_Type;
LS_HIDDEN extern PyTypeObject ls_TimedPoller_Type;
LS_HIDDEN extern PyTypeObject ls_Reraise_Type;       /* (not exported) */
LS_HIDDEN extern PyTypeObject ls_Engine_Type;        /* endpoint.c */

LS_HIDDEN extern PyMethodDef ls_watch_methods[]; /* watch.c: watch_steps, wake_watchers */
/* watch.c: the watchdog's condition variable, re-made in a child after fork.  -1 with
 * OSError set on failure. */
LS_HIDDEN int ls_watch_init(void);

#endif
