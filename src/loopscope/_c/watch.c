/*
 * The watchdog's side of the step markers: the start slots that each recorder on the native
 * clock writes its step's start to, and watch_steps(), the watchdog thread's wait between
 * its checks, which reads them without the GIL.
 */
#include "speedups.h"

#include <errno.h>
#include <pthread.h>
#include <time.h>

/* The starts of the steps running now, one slot per recorder on the native clock, in
 * memory that is never freed: the watchdog's wait (watch_steps) reads them without the
 * GIL and without holding any recorder, so neither a recorder nor its loop is kept alive
 * by it.  A slot freed and taken again is at worst read as another loop's start, which
 * only makes the watchdog look (with the GIL) one interval early.  Slots are padded to a
 * cache line each: loops in different threads do not share one.  Taken and freed with
 * the GIL held; stored and loaded as relaxed atomics (store_double, load_double). */
#define START_SLOTS 1024
typedef struct {
    double start;
    char pad[64 - sizeof(double)];
} StartSlot;
static StartSlot start_slots[START_SLOTS];
static unsigned char slot_taken[START_SLOTS];
static int slots_high; /* 1 + the highest slot ever taken: watch_steps reads up to it */

int ls_take_slot(void) {
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

double *ls_slot_start(int i) {
    return &start_slots[i].start;
}

void ls_free_slot(int i) {
    store_double(&start_slots[i].start, 0.0);
    slot_taken[i] = 0;
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

static int watch_cond_init(void) {
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
    (void)watch_cond_init();
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
    ls_gil_disarm(); /* this wait needs no GIL */
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
    /* Taking the GIL back may take as long as a C call holding it lasts: the GIL reader
     * reads the loops' stacks if it does (sentinel.c), until the next wait. */
    ls_gil_arm(0.0);
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

PyMethodDef ls_watch_methods[] = {
    {"watch_steps", (PyCFunction)(void (*)(void))watch_steps, METH_FASTCALL,
     "watch_steps($module, sample_after, interval, timeout, /)\n--\n\n"
     "The watchdog's wait between checks, "
     "without the GIL; True when a step has run for sample_after."},
    {"wake_watchers", wake_watchers, METH_NOARGS,
     "wake_watchers($module, /)\n--\n\nMake every watch_steps() waiting now return False."},
    {NULL, NULL, 0, NULL}};

int ls_watch_init(void) {
    if (watch_cond_init() < 0 || pthread_atfork(NULL, NULL, watch_after_fork) != 0) {
        PyErr_SetString(PyExc_OSError, "cannot set up the watchdog's condition variable");
        return -1;
    }
    return 0;
}
