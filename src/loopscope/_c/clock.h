/*
 * loopscope's native clock: time.monotonic() in seconds, read from C.
 *
 * Every timed callback reads the clock three times (when it is scheduled, when it starts,
 * when it ends).  clock_gettime(CLOCK_MONOTONIC) costs about 24 ns here even through the
 * vDSO (a serialising rdtscp and a sequence lock around the kernel's conversion); the
 * processor's time-stamp counter read with rdtsc costs about 10 ns.  Where the kernel
 * itself computes CLOCK_MONOTONIC from that counter (clocksource "tsc": the kernel has
 * found it constant-rate and in step across CPUs), this clock reads the counter and
 * converts it with a scale it measures against clock_gettime, re-anchored on
 * clock_gettime at least once a second; a re-anchor that finds the counter off by more
 * than 1 ms (or than NTP's largest slew over the time since the last anchor) counts a
 * fault, and after three the counter is never used again.  While the counter is in use,
 * values never go backwards (at a fault one reading may: callers clamp their differences).
 * Anywhere else (another clocksource, another processor, a build without the GIL, a
 * process where rdtsc would trap) it is clock_gettime.
 *
 * native_now()'s state is process-wide and guarded by the GIL: every caller holds it.
 * clock_gettime_seconds() keeps no state and is called without the GIL too (the endpoint's
 * engine, the watchdog's wait).
 */
#ifndef LOOPSCOPE_CLOCK_H
#define LOOPSCOPE_CLOCK_H

#include "compat.h" /* Python.h, LS_HIDDEN */

#include <stdint.h>
#include <time.h>

#if defined(__linux__) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(Py_GIL_DISABLED)
#define FAST_CLOCK 1
#include <x86intrin.h>
#else
#define FAST_CLOCK 0
#endif

typedef struct {
    int enabled;          /* the counter is in use (or being calibrated) */
    uint64_t horizon;     /* ticks after anchor_tsc read with the scale; 0 while calibrating */
    uint64_t anchor_tsc;  /* the last pair read together */
    double anchor_sec;
    uint64_t base_tsc;    /* the first pair: the scale is measured from it */
    double base_sec;
    double scale;         /* seconds per tick */
    double last;          /* the latest value handed out */
    unsigned long long anchors, faults;
} FastClock;

LS_HIDDEN extern FastClock ls_fast_clock;

/* time.monotonic()'s own clock */
static inline double clock_gettime_seconds(void) {
#ifdef __APPLE__
    return (double)clock_gettime_nsec_np(CLOCK_UPTIME_RAW) / 1e9;
#else
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)((long long)ts.tv_sec * 1000000000LL + ts.tv_nsec) / 1e9;
#endif
}

#if FAST_CLOCK
LS_HIDDEN double ls_fast_clock_anchor(uint64_t tsc); /* clock.c: the slow path */
#endif

/* time.monotonic(), as a double. */
static inline double native_now(void) {
#if FAST_CLOCK
    if (LS_LIKELY(ls_fast_clock.enabled)) {
        uint64_t tsc = __rdtsc();
        uint64_t ticks = tsc - ls_fast_clock.anchor_tsc;
        if (LS_LIKELY(ticks < ls_fast_clock.horizon)) {
            /* ticks < horizon, about a second's worth: converted as a signed number,
             * one instruction where the unsigned conversion takes several */
            double now = ls_fast_clock.anchor_sec + (double)(int64_t)ticks * ls_fast_clock.scale;
            if (now < ls_fast_clock.last)
                return ls_fast_clock.last;
            ls_fast_clock.last = now;
            return now;
        }
        return ls_fast_clock_anchor(tsc);
    }
#endif
    return clock_gettime_seconds();
}

/* Module functions (clock.c): clock_info(), and the test hooks _clock_skew(seconds) and
 * _clock_reset(). */
LS_HIDDEN extern PyMethodDef ls_clock_methods[];

/* Called once at module init: decides whether the counter may be used. */
LS_HIDDEN void ls_fast_clock_init(void);

#endif
