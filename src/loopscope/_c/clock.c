/*
 * loopscope's native clock: the slow path of native_now() (see clock.h) and its module
 * functions.
 */
#include "clock.h"

#include <math.h>
#include <stdio.h>
#include <string.h>
#if FAST_CLOCK
#include <sys/prctl.h>
#endif

FastClock ls_fast_clock;

#if FAST_CLOCK
/* A pair (counter, clock_gettime) is taken only when the counter reads before and after
 * clock_gettime are this close: a thread preempted in between would give a pair off by
 * the time it was away.  clock_gettime through the vDSO is about 100 ticks; this allows a
 * system call (no vDSO) on a slow processor. */
#define PAIR_TICKS 20000
#define CALIBRATE_AFTER 0.01    /* the scale is first measured over 10 ms */
#define ANCHOR_EVERY 1.0        /* then a new pair at least once a second */
#define REBASE_AFTER 60.0       /* and the scale is measured over at most a minute or so */
/* A new pair may differ from what the counter predicts by 1 ms, or by 500 ppm of the time
 * since the last pair if that is more: the most NTP slews CLOCK_MONOTONIC by, and its slew
 * may change while the loop sleeps for minutes without reading the clock. */
#define FAST_CLOCK_TOLERANCE 0.001
#define SLEW_TOLERANCE 500e-6
#define MAX_FAULTS 3
#define MAX_LOOSE_PAIRS 1000 /* in a row: the counter is given up */

static int fast_clock_allowed; /* decided once, at module init */
static int calibrated;         /* the scale has been measured */
static int loose_pairs;        /* unusable pairs in a row */

static void start_over(uint64_t tsc, double now) {
    ls_fast_clock.base_tsc = ls_fast_clock.anchor_tsc = tsc;
    ls_fast_clock.base_sec = ls_fast_clock.anchor_sec = now;
    ls_fast_clock.horizon = 0;
    calibrated = 0;
}

double ls_fast_clock_anchor(uint64_t before) {
    FastClock *c = &ls_fast_clock;
    double now = clock_gettime_seconds();
    uint64_t after = __rdtsc();
    if (after < before || after - before > PAIR_TICKS) {
        /* not a usable pair: the next read tries again */
        if (++loose_pairs >= MAX_LOOSE_PAIRS)
            c->enabled = 0;
        goto out;
    }
    loose_pairs = 0;
    uint64_t tsc = before + (after - before) / 2;
    if (c->anchors++ == 0) {
        start_over(tsc, now);
        goto out;
    }
    if (calibrated) {
        double predicted = c->anchor_sec + (double)(int64_t)(tsc - c->anchor_tsc) * c->scale;
        double since = now - c->anchor_sec;
        double tolerance = FAST_CLOCK_TOLERANCE;
        if (since * SLEW_TOLERANCE > tolerance)
            tolerance = since * SLEW_TOLERANCE;
        if (!(fabs(predicted - now) <= tolerance)) {
            /* The counter did not keep time with the clock (a jump, a change of rate). */
            if (++c->faults >= MAX_FAULTS)
                c->enabled = 0;
            start_over(tsc, now);
            c->last = now; /* it may step back once; callers clamp their differences */
            return now;
        }
    }
    double span = now - c->base_sec;
    if (span >= CALIBRATE_AFTER && tsc > c->base_tsc) {
        double scale = span / (double)(tsc - c->base_tsc);
        if (!(scale > 1e-11 && scale < 1e-8)) { /* 100 MHz to 100 GHz, else not a clock */
            c->enabled = 0;
            goto out;
        }
        c->scale = scale;
        c->horizon = (uint64_t)((span < ANCHOR_EVERY ? span : ANCHOR_EVERY) / scale);
        calibrated = 1;
        if (span > REBASE_AFTER) {
            c->base_tsc = tsc;
            c->base_sec = now;
        }
    }
    c->anchor_tsc = tsc;
    c->anchor_sec = now;
out:
    if (now < c->last)
        return c->last;
    c->last = now;
    return now;
}

static int counter_allowed(void) {
    /* Only where the kernel keeps CLOCK_MONOTONIC with this counter itself. */
    char source[32] = {0};
    FILE *f = fopen("/sys/devices/system/clocksource/clocksource0/current_clocksource", "r");
    if (f == NULL)
        return 0;
    size_t n = fread(source, 1, sizeof(source) - 1, f);
    fclose(f);
    if (n < 3 || strncmp(source, "tsc", 3) != 0 || (source[3] != '\n' && source[3] != '\0'))
        return 0;
    /* and not in a process where rdtsc traps (prctl PR_SET_TSC) */
    int mode = 0;
    if (prctl(PR_GET_TSC, &mode, 0, 0, 0) != 0 || mode != PR_TSC_ENABLE)
        return 0;
    return 1;
}

static void clock_restart(void) {
    memset(&ls_fast_clock, 0, sizeof(ls_fast_clock));
    calibrated = 0;
    loose_pairs = 0;
    ls_fast_clock.enabled = fast_clock_allowed;
}
#endif

void ls_fast_clock_init(void) {
#if FAST_CLOCK
    fast_clock_allowed = counter_allowed();
    clock_restart();
#endif
}

static PyObject *clock_info(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored)) {
#if FAST_CLOCK
    const char *source = ls_fast_clock.enabled ? "tsc" : "clock_gettime";
    double hz = ls_fast_clock.enabled && calibrated ? 1.0 / ls_fast_clock.scale : 0.0;
    return Py_BuildValue("{s:s,s:O,s:d,s:K,s:K}", "source", source, "calibrated",
                         ls_fast_clock.enabled && calibrated ? Py_True : Py_False, "counter_hz",
                         hz, "anchors", ls_fast_clock.anchors, "faults", ls_fast_clock.faults);
#else
    return Py_BuildValue("{s:s,s:O,s:d,s:K,s:K}", "source", "clock_gettime", "calibrated",
                         Py_False, "counter_hz", 0.0, "anchors", 0ULL, "faults", 0ULL);
#endif
}

/* Test hooks: move the counter's anchor by `seconds` and make the next read take a new
 * pair, as if the counter had jumped; and start the clock over as at import. */
static PyObject *clock_skew(PyObject *Py_UNUSED(module), PyObject *arg) {
    double seconds = PyFloat_AsDouble(arg);
    if (seconds == -1.0 && PyErr_Occurred())
        return NULL;
#if FAST_CLOCK
    if (!(ls_fast_clock.enabled && calibrated)) {
        PyErr_SetString(PyExc_RuntimeError, "the counter is not in use or not calibrated");
        return NULL;
    }
    ls_fast_clock.anchor_sec += seconds;
    ls_fast_clock.horizon = 0;
    Py_RETURN_NONE;
#else
    PyErr_SetString(PyExc_RuntimeError, "the counter is not in use on this platform");
    return NULL;
#endif
}

static PyObject *clock_reset(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored)) {
#if FAST_CLOCK
    clock_restart();
#endif
    Py_RETURN_NONE;
}

static PyObject *clock_now(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored)) {
    return PyFloat_FromDouble(native_now());
}

PyMethodDef ls_clock_methods[] = {
    {"clock_info", clock_info, METH_NOARGS,
     "clock_info($module, /)\n--\n\n"
     "The native clock: its source ('tsc' or 'clock_gettime'), whether the counter's rate "
     "is measured yet, that rate, how many pairs were taken and how many faults seen."},
    {"clock_now", clock_now, METH_NOARGS,
     "clock_now($module, /)\n--\n\nRead the native clock (time.monotonic's timebase)."},
    {"_clock_skew", clock_skew, METH_O,
     "_clock_skew($module, seconds, /)\n--\n\nTest hook: shift the counter's anchor by seconds."},
    {"_clock_reset", clock_reset, METH_NOARGS,
     "_clock_reset($module, /)\n--\n\nTest hook: start the native clock over."},
    {NULL, NULL, 0, NULL}};
