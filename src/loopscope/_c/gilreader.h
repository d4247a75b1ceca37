/*
 * The GIL reader: where a loop thread is while it holds the GIL in one long C call
 * (json.loads of a large body, a backtracking regular expression, sorted() of millions of
 * items), read while the call lasts.  What its three files share:
 *
 *   framecopy.c  copies of one thread's frames, made without the GIL: the only file that
 *                knows the interpreter's frame layout.
 *   sentinel.c   the registrations of the loop threads, and the sentinel: a plain thread
 *                of ours, which never touches the Python API, armed by the watchdog whenever
 *                it is out of its wait (it wants the GIL); when a loop thread then keeps the
 *                GIL for a few switch intervals without a switch, it copies that thread's
 *                stack, and it reports a block that goes on on stderr itself.
 *   gilreader.c  the module loopscope._speedups.gil_reader (the Python side, with the GIL).
 *
 * The reader is built on Linux for CPython 3.10 to 3.13 (with the GIL); elsewhere it is off
 * and gil_reader.status() says why.
 */
#ifndef LOOPSCOPE_GILREADER_H
#define LOOPSCOPE_GILREADER_H

#include "speedups.h"

#if defined(__linux__) && PY_VERSION_HEX >= 0x030A0000 && PY_VERSION_HEX < 0x030E0000 &&     \
    !defined(Py_GIL_DISABLED)
#define GIL_READER 1
#endif

#ifdef GIL_READER
#include <pthread.h>

/* Registrations: one per running loop. */
#define MAX_REGS 64
/* Bytes of one capture's entries, and of one name or file name. */
#define CAPTURE_BYTES (32 * 1024)
#define NAME_BYTES 1024
/* Captures kept per registration: an arming's first (where the block is), its first one
 * old enough to be reported (loop_blocked's first report), and the latest. */
#define KEPT 3
/* Entries of one capture at most: 100 frames and the one saying how many were left out. */
#define MAX_ENTRIES 101

/* Where a loop's step start is: a C recorder's double (its start slot or its own field),
 * or a pure recorder's current_start slot (a float object) at `offset` in `recorder`. */
typedef struct {
    double *start_double;
    const void *recorder;
    Py_ssize_t offset; /* -1: not known */
} ls_StartRef;

/* One thread's stack: `entries` NUL-terminated "path:line in name" in `text`, outermost
 * first (as _stacks.format_stack lays them out). */
typedef struct {
    unsigned long seq; /* 0: none */
    double step_start; /* 0.0: not known */
    double captured_at;
    int entries;
    size_t used;
    char *text; /* CAPTURE_BYTES */
} ls_Capture;

/* framecopy.c: (only while nothing can free what is read: see sentinel.c) */

/* Whether process_vm_readv works on our own memory here; NULL, or why not. */
LS_HIDDEN const char *ls_framecopy_init(void);
LS_HIDDEN void ls_framecopy_after_fork(void);
/* Who holds the GIL (a thread state) and how many times it went to another thread: 1 while
 * it is held, 0 while it is free, -1 when it cannot be read. */
LS_HIDDEN int ls_gil_holder(uintptr_t *holder, unsigned long *switches);
/* The step start of `ref`: 0.0 between steps, -1.0 when it cannot be read. */
LS_HIDDEN double ls_read_start(const ls_StartRef *ref);
/* Copy the stack of `tstate` (whose thread_id must be `thread_id`) into `capture`; -1 when
 * it could not be read, or moved during the read. */
LS_HIDDEN int ls_read_stack(PyThreadState *tstate, unsigned long thread_id,
                            const ls_StartRef *start, ls_Capture *capture);

/* sentinel.c (each with the GIL unless said otherwise) */

LS_HIDDEN int ls_sentinel_init(void);
/* Register a loop thread; a handle, or -1 (every registration taken, or the sentinel
 * cannot start).  On success the registration keeps `texts` (KEPT * CAPTURE_BYTES bytes)
 * and the reference to start->recorder it is given, until ls_sentinel_remove. */
LS_HIDDEN long ls_sentinel_add(PyThreadState *tstate, const ls_StartRef *start,
                               const char *label, char *texts);
/* The registration of `handle` ends; returns its recorder (to DECREF), or NULL. */
LS_HIDDEN const void *ls_sentinel_remove(long handle);
/* Copies of `handle`'s captures newer than `after` into `copies` (texts at `texts`,
 * KEPT * CAPTURE_BYTES bytes); their number. */
LS_HIDDEN int ls_sentinel_copy(long handle, unsigned long after, ls_Capture *copies,
                               char *texts);
LS_HIDDEN void ls_sentinel_configure(double grace, double first_report, int stderr_reports,
                                     char (*rules)[NAME_BYTES], int count);
LS_HIDDEN int ls_sentinel_registered(void);
#define MAX_RULES 16
#endif

#endif
