/*
 * The timed call: what TimedCallback and TimedIO (uvloop_hooks.c) and TimedRun
 * (asyncio_hooks.c) do around the call of a callback, written once:
 *
 *   read the clock; mark the step as running (mark_start); call; keep the callback's
 *   exception aside; mark the step as over (mark_end), on every way out, SystemExit and
 *   KeyboardInterrupt included; read the clock; record the step (record or record_io);
 *   hand a fault of that bookkeeping to the probe; restore the callback's exception.
 *
 * What differs from one wrapper to another is described by a TimedCall, a constant at each
 * call site: timed_call() is inlined into each wrapper's vectorcall function with only the
 * branches that wrapper takes and its hooks inlined, so a call costs what the hand-written
 * version did.
 */
#ifndef LOOPSCOPE_TIMED_H
#define LOOPSCOPE_TIMED_H

#include "speedups.h"

/* One call of a wrapper. */
typedef struct {
    PyObject *wrapper;     /* the TimedCallback, TimedIO or TimedRun called */
    Recorder *recorder;
    PyObject *const *args; /* what the wrapper was called with */
    size_t nargsf;
    PyObject *kwnames;
    double ready;          /* when the callback was made ready (TimedCallback) */
    PyObject *callback;    /* the step's callback, a strong reference (set by timed_call) */
} TimedStep;

/* When the clock cannot be read before the call: */
typedef enum {
    CLOCK_FAULT_START_AT_READY, /* the fault goes to the probe and the step is taken to
                                   start when it was made ready (TimedCallback) */
    CLOCK_FAULT_UNTIMED,        /* the fault goes to the probe and the callback is called
                                   untimed (TimedIO) */
    CLOCK_FAULT_RAISES,         /* the error is raised and nothing is called (TimedRun) */
} ClockFault;

/* How a wrapper's calls are timed. */
typedef struct {
    /* Whether this call is timed at all; NULL: always.  Never leaves an exception set.
     * (TimedIO: not inside a step already timed, nor once the probe is inactive.) */
    int (*is_timed)(Recorder *r);
    ClockFault clock_fault;
    /* The step's callback, a new reference; NULL with an exception set, which is raised
     * (nothing is called).  Read after the first clock read. */
    PyObject *(*callback)(TimedStep *step);
    /* The call itself: a new reference, or NULL with the callback's exception set. */
    PyObject *(*call)(TimedStep *step);
    /* Whether a call that raised is recorded.  TimedCallback and TimedIO record it,
     * whatever it raised; TimedRun records nothing (only SystemExit and KeyboardInterrupt
     * get out of its call: the others go to the loop's exception handler). */
    int record_raised;
    /* Record the step (record or record_io): 0, or -1 with an exception set. */
    int (*record)(TimedStep *step, double start, double end);
    /* Whether the step starts where the step before it ended, r->chain_end (not 0.0: a
     * step of this wrapper's kind ended there and nothing measured has run since), with
     * no clock read; NULL: never.  The end of every step of a wrapper with this hook is
     * kept for the next.  (TimedCallback: see timed_callback_chains.) */
    int (*may_chain)(TimedStep *step, double chain_end);
    /* Whether a fault of the bookkeeping that is not an Exception (a KeyboardInterrupt in
     * a slow-step event) is raised in place of the call's result, as the pure path's
     * `except Exception` lets it through (TimedRun); otherwise every fault goes to the
     * probe.  Only for calls that returned: a callback's own exception is never lost. */
    int raise_base_faults;
} TimedCall;

LS_ALWAYS_INLINE PyObject *timed_call(TimedStep *step, const TimedCall *how) {
    Recorder *r = step->recorder;
    double start, end;
    int timed = how->is_timed == NULL || how->is_timed(r);
    double chain_end = r->chain_end;
    r->chain_end = 0.0; /* something measured runs: the next step can't take its start */
    if (timed && how->may_chain != NULL && chain_end != 0.0 && how->may_chain(step, chain_end))
        start = chain_end;
    else if (timed && LS_UNLIKELY(read_clock(r, &start) < 0)) {
        if (how->clock_fault == CLOCK_FAULT_RAISES)
            return NULL;
        ls_report_fault(r);
        if (how->clock_fault == CLOCK_FAULT_START_AT_READY)
            start = step->ready;
        else
            timed = 0;
    }
    step->callback = how->callback(step);
    if (LS_UNLIKELY(step->callback == NULL))
        return NULL;
    if (!timed) {
        PyObject *result = how->call(step);
        Py_CLEAR(step->callback);
        return result;
    }

    mark_start(r, step->callback, start);
    PyObject *result = how->call(step);
    /* finally: (the callback's exception, if any, is kept aside and restored) */
    saved_exc saved = {0};
    if (LS_UNLIKELY(result == NULL))
        exc_save(&saved);
    mark_end(r); /* a marker left set: the watchdog would report an idle loop as blocked */
    int fault = 0;
    if (result != NULL || how->record_raised) {
        fault = read_clock(r, &end) < 0 || how->record(step, start, end) < 0;
        /* Not past a step at or over the floor: its record ran Python code (a slow-step
         * report, an exemplar) after the end was read. */
        if (how->may_chain != NULL && !fault && end - start < r->floor)
            r->chain_end = end;
    }
    Py_CLEAR(step->callback);
    if (LS_UNLIKELY(fault)) {
        if (how->raise_base_faults && result != NULL &&
            !PyErr_ExceptionMatches(PyExc_Exception)) {
            Py_DECREF(result);
            return NULL;
        }
        ls_report_fault(r);
    }
    if (LS_UNLIKELY(result == NULL))
        exc_restore(&saved);
    return result;
}

#endif
