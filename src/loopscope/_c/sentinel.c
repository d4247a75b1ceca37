/*
 * The GIL reader's registrations and its sentinel thread (see gilreader.h).
 *
 * The watchdog arms the sentinel whenever it is out of its wait, from the moment it wants
 * the GIL (back), and disarms it when it waits without the GIL again.  While it is armed,
 * the sentinel looks at the GIL every switch interval: who holds it and how many times it
 * has gone to another thread.  A thread that runs bytecode gives the GIL up within about
 * one switch interval once another thread asks for it; so when a registered loop thread
 * has kept it for the grace (a few switch intervals) without a switch while the watchdog
 * wants it, that thread sits in one C call and its frames stand still.  The sentinel then
 * copies its stack (framecopy.c, which drops a read during which the stack moved after
 * all), keeps the copy for the watchdog, and while the block goes on copies it again at
 * the ages the watchdog would report it (first_report, then twice... that, at most a minute
 * apart), writing each of those reports to stderr itself.
 *
 * Everything here is guarded by gr_mutex, which the sentinel holds while it reads: a loop
 * thread that unregisters (once per run of its loop, with the GIL) waits for a read to end,
 * so no thread state is read after its thread has let it go.  No Python object is made or
 * freed with gr_mutex held, and stderr is written without it.
 */
#include "gilreader.h"

#ifdef GIL_READER

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define LABEL_BYTES 128
#define REPORT_BYTES (32 * 1024)
#define DUE_MARGIN 0.002

typedef struct {
    int used;
    unsigned int generation;
    PyThreadState *tstate;
    unsigned long thread_id;
    ls_StartRef start; /* holds a reference to its recorder */
    char label[LABEL_BYTES];
    double kept_base; /* the start of the step (block) the captures belong to */
    ls_Capture kept[KEPT];
    double report_base, report_due; /* the schedule of one block's reports */
} Registration;

static pthread_mutex_t gr_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t gr_cond;
static Registration regs[MAX_REGS];
static int regs_used; /* also read without the mutex (gil_reader.captures) */
static int started;
static int armed;
static double want_since; /* when the watchdog wants the GIL (back) */
/* What the sentinel sees of the GIL since want_since: who holds it, its switch count, and
 * since when it has not moved; whether that block was read yet, and the next read. */
static uintptr_t held_by;
static unsigned long held_switches;
static double held_since;
static int block_read;
static double next_action;
static double poll = 0.005; /* how often the GIL is looked at: the switch interval */
static unsigned long capture_seq;
static double grace = 0.025;
static double first_report = 1.0;
static int stderr_reports = 1;
/* Which files are not the application's, as rules tried in order: "+prefix" a library,
 * "-prefix" the application, "~part" (contained) the application (_stacks._is_library). */
static char file_rules[MAX_RULES][NAME_BYTES];
static int n_rules;
static char *report; /* stderr text */

static int is_library(const char *filename) {
    if (strncmp(filename, "<frozen", 7) == 0)
        return 1;
    if (filename[0] != '/')
        return 0;
    for (int i = 0; i < n_rules; i++) {
        const char *rule = file_rules[i], *text = rule + 1;
        int hit = rule[0] == '~' ? strstr(filename, text) != NULL
                                 : strncmp(filename, text, strlen(text)) == 0;
        if (hit)
            return rule[0] == '+';
    }
    return 0;
}

/* The entry's file name: "path" of "path:line in name". */
static void entry_file(const char *entry, char *out, size_t cap) {
    const char *in = strstr(entry, " in ");
    const char *last_in = in;
    while (in != NULL) {
        last_in = in;
        in = strstr(in + 1, " in ");
    }
    size_t n = last_in != NULL ? (size_t)(last_in - entry) : strlen(entry);
    const char *colon = NULL;
    for (size_t i = 0; i < n; i++)
        if (entry[i] == ':')
            colon = entry + i;
    if (colon != NULL)
        n = (size_t)(colon - entry);
    if (n >= cap)
        n = cap - 1;
    memcpy(out, entry, n);
    out[n] = '\0';
}

/* The stderr report of registration `r`'s block, into `report` at *at. */
static void format_report(Registration *r, const ls_Capture *capture, double blocked, double held,
                          size_t *at) {
    const char *entries[MAX_ENTRIES];
    int n = 0;
    const char *p = capture->text;
    for (int i = 0; i < capture->entries && n < MAX_ENTRIES; i++) {
        entries[n++] = p;
        p += strlen(p) + 1;
    }
    const char *where = n > 0 ? entries[n - 1] : "?";
    char filename[NAME_BYTES];
    for (int i = n - 1; i >= 0; i--) {
        entry_file(entries[i], filename, sizeof(filename));
        if (strncmp(entries[i], "... (", 5) != 0 && !is_library(filename)) {
            where = entries[i];
            break;
        }
    }
    int w = snprintf(report + *at, REPORT_BYTES - *at,
                     "loopscope: loop '%s' of process %ld blocked for %.1f s, in a call that "
                     "has held the GIL for %.1f s, at %s\nStack (most recent call last):\n",
                     r->label, (long)getpid(), blocked, held, where);
    if (w < 0 || (size_t)w >= REPORT_BYTES - *at)
        return;
    *at += (size_t)w;
    for (int i = 0; i < n; i++) {
        w = snprintf(report + *at, REPORT_BYTES - *at, "  %s\n", entries[i]);
        if (w < 0 || (size_t)w >= REPORT_BYTES - *at)
            return;
        *at += (size_t)w;
    }
}

static void store(ls_Capture *into, const ls_Capture *from, double now) {
    memcpy(into->text, from->text, from->used);
    into->used = from->used;
    into->entries = from->entries;
    into->step_start = from->step_start;
    into->captured_at = now;
    into->seq = ++capture_seq;
}

/* One capture of registration `r`'s block that started at `base`, kept as the block's
 * first, else as its first one old enough to be reported (`reportable`), else as the
 * latest; the capture, or NULL. */
static ls_Capture *capture_now(Registration *r, ls_Capture *scratch, double now, double base,
                               int reportable) {
    if (ls_read_stack(r->tstate, r->thread_id, &r->start, scratch) < 0)
        return NULL;
    if (r->kept_base != base) {
        r->kept_base = base;
        for (int k = 0; k < KEPT; k++)
            r->kept[k].seq = 0;
    }
    ls_Capture *into = r->kept[0].seq == 0 ? &r->kept[0]
                    : reportable && r->kept[1].seq == 0 ? &r->kept[1]
                                                        : &r->kept[2];
    store(into, scratch, now);
    return into;
}

/* The block of registration `r` at `now`: its first read, then the reads (and stderr
 * reports) at the ages the watchdog would report it, first_report, twice that... (at most
 * a minute apart).  Returns when the next one is due; report text is left in `report`
 * (*length bytes). */
static double act(Registration *r, double now, ls_Capture *scratch, size_t *length) {
    *length = 0;
    double base = ls_read_start(&r->start);
    if (base == 0.0)
        return now + 3600.0; /* between steps: what holds the GIL is not the loop's step */
    if (base < 0.0)
        base = held_since; /* not known: blocked since the GIL stopped moving, at least */
    if (r->report_base != base) {
        r->report_base = base;
        r->report_due = first_report;
    }
    double age = now - base;
    ls_Capture *taken = NULL;
    if (!block_read)
        taken = capture_now(r, scratch, now, base, age >= r->report_due);
    block_read = 1;
    if (age >= r->report_due) {
        if (taken == NULL)
            taken = capture_now(r, scratch, now, base, 1);
        /* Written only for a GIL held for half that age at least: a thread that runs
         * bytecode on a machine too busy to hand the GIL over within the grace is not
         * in "a call that holds the GIL" (its events are right all the same). */
        if (taken != NULL && stderr_reports && now - held_since >= first_report / 2)
            format_report(r, taken, age, now - held_since, length);
        double due = r->report_due * 2;
        if (due < age)
            due = age;
        if (due > r->report_due + 60.0)
            due = r->report_due + 60.0;
        r->report_due = due;
    }
    /* Read a little after the age is reached: the watchdog compares it with the step's
     * start on the loop's clock, which may be a hair off this one. */
    return base + r->report_due + DUE_MARGIN;
}

/* The registration whose thread state is `tstate`, or NULL. */
static Registration *registered_thread(uintptr_t tstate) {
    for (int i = 0; i < MAX_REGS; i++)
        if (regs[i].used && (uintptr_t)regs[i].tstate == tstate)
            return &regs[i];
    return NULL;
}

static void write_all(const char *text, size_t length) {
    while (length > 0) {
        ssize_t n = write(2, text, length);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        text += n;
        length -= (size_t)n;
    }
}

static void timed_wait(double until) {
    struct timespec ts;
    double whole = (double)(long long)until;
    ts.tv_sec = (time_t)whole;
    ts.tv_nsec = (long)((until - whole) * 1e9);
    if (ts.tv_nsec >= 1000000000L)
        ts.tv_nsec = 999999999L;
    pthread_cond_timedwait(&gr_cond, &gr_mutex, &ts);
}

/* One round of the sentinel, armed and past want_since: watch the GIL, and read the stack
 * of a loop thread that has kept it for the grace without a switch.  Returns when to look
 * again. */
static double watch_gil(double now, ls_Capture *scratch, size_t *length) {
    *length = 0;
    uintptr_t holder;
    unsigned long switches;
    if (ls_gil_holder(&holder, &switches) <= 0 || holder != held_by ||
        switches != held_switches) {
        held_by = holder; /* the GIL moved (or is free): a new observation */
        held_switches = switches;
        held_since = now;
        block_read = 0;
        return now + poll;
    }
    if (now - held_since < grace)
        return held_since + grace;
    Registration *r = registered_thread(holder);
    if (r == NULL)
        return now + poll; /* not a loop thread: reported by the watchdog afterwards */
    /* A new block: the first read of this observation, or another step of the loop's
     * (steps that each hold the GIL throughout, one after the other). */
    double next = block_read && ls_read_start(&r->start) == r->report_base ? next_action : now;
    if (now >= next)
        next_action = next = act(r, now, scratch, length);
    /* Keep watching the GIL meanwhile: its next switch ends the block. */
    return next < now + poll ? next : now + poll;
}

static void *sentinel(void *unused) {
    (void)unused;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL); /* signals are the application's threads' */
    ls_Capture scratch = {0};
    scratch.text = malloc(CAPTURE_BYTES);
    if (scratch.text == NULL)
        return NULL;
    pthread_mutex_lock(&gr_mutex);
    for (;;) {
        if (!armed) {
            held_by = 0;
            pthread_cond_wait(&gr_cond, &gr_mutex);
            continue;
        }
        double now = clock_gettime_seconds();
        if (now < want_since) {
            timed_wait(want_since);
            continue;
        }
        size_t length;
        double next = watch_gil(now, &scratch, &length);
        if (length > 0) {
            /* Written without the mutex: a stderr that blocks must not block the loops. */
            char *text = malloc(length);
            if (text != NULL) {
                memcpy(text, report, length);
                pthread_mutex_unlock(&gr_mutex);
                write_all(text, length);
                free(text);
                pthread_mutex_lock(&gr_mutex);
                continue;
            }
        }
        timed_wait(next);
    }
    return NULL;
}

static int start_sentinel(void) {
    if (started)
        return 0;
    if (report == NULL)
        report = malloc(REPORT_BYTES);
    if (report == NULL)
        return -1;
    pthread_attr_t attr;
    pthread_t thread;
    if (pthread_attr_init(&attr) != 0)
        return -1;
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int rc = pthread_create(&thread, &attr, sentinel, NULL);
    pthread_attr_destroy(&attr);
    if (rc != 0)
        return -1;
    started = 1;
    return 0;
}

static int cond_init(void) {
    pthread_condattr_t attr;
    if (pthread_condattr_init(&attr) != 0)
        return -1;
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    int rc = pthread_cond_init(&gr_cond, &attr);
    pthread_condattr_destroy(&attr);
    return rc == 0 ? 0 : -1;
}

static void after_fork_in_child(void) {
    /* The sentinel did not survive the fork, and neither did any loop thread but the one
     * that forked: the registrations are the parent's. */
    pthread_mutex_init(&gr_mutex, NULL);
    (void)cond_init();
    ls_framecopy_after_fork();
    started = 0;
    armed = 0;
    regs_used = 0;
    for (int i = 0; i < MAX_REGS; i++) {
        /* Their recorders stay referenced (no Python call is allowed in an atfork
         * handler): a handful of objects at most, once per fork. */
        regs[i].used = 0;
        regs[i].start.recorder = NULL;
        regs[i].generation++;
    }
}

int ls_sentinel_init(void) {
    if (cond_init() < 0 || pthread_atfork(NULL, NULL, after_fork_in_child) != 0)
        return -1;
    return 0;
}

/* Recorded whether or not a loop is registered yet: a loop registered during the wait is
 * watched from its end. */
void ls_gil_arm(double wait) {
    double now = clock_gettime_seconds();
    pthread_mutex_lock(&gr_mutex);
    armed = 1;
    held_by = 0;
    want_since = now + wait;
    if (started)
        pthread_cond_signal(&gr_cond);
    pthread_mutex_unlock(&gr_mutex);
}

void ls_gil_disarm(void) {
    pthread_mutex_lock(&gr_mutex);
    armed = 0;
    pthread_mutex_unlock(&gr_mutex);
}

int ls_sentinel_registered(void) {
    return __atomic_load_n(&regs_used, __ATOMIC_RELAXED);
}

long ls_sentinel_add(PyThreadState *tstate, const ls_StartRef *start, const char *label,
                     char *texts) {
    long handle = -1;
    pthread_mutex_lock(&gr_mutex);
    for (int i = 0; i < MAX_REGS && start_sentinel() == 0; i++) {
        Registration *r = &regs[i];
        if (r->used)
            continue;
        free(r->kept[0].text); /* a former registration's */
        for (int k = 0; k < KEPT; k++) {
            memset(&r->kept[k], 0, sizeof(ls_Capture));
            r->kept[k].text = texts + (size_t)k * CAPTURE_BYTES;
        }
        r->tstate = tstate;
        r->thread_id = tstate->thread_id;
        r->start = *start;
        snprintf(r->label, LABEL_BYTES, "%s", label);
        r->kept_base = 0.0;
        r->report_base = 0.0;
        r->generation++;
        r->used = 1;
        __atomic_store_n(&regs_used, regs_used + 1, __ATOMIC_RELAXED);
        handle = (long)i | ((long)(r->generation & 0xFFFFFF) << 8);
        break;
    }
    pthread_mutex_unlock(&gr_mutex);
    return handle;
}

/* The registration of `handle`, or NULL; with gr_mutex held. */
static Registration *registration(long handle) {
    if (handle < 0 || (handle & 0xFF) >= MAX_REGS)
        return NULL;
    Registration *r = &regs[handle & 0xFF];
    return r->used && (long)(r->generation & 0xFFFFFF) == (handle >> 8) ? r : NULL;
}

const void *ls_sentinel_remove(long handle) {
    const void *recorder = NULL;
    pthread_mutex_lock(&gr_mutex);
    Registration *r = registration(handle);
    if (r != NULL) {
        r->used = 0;
        r->tstate = NULL;
        recorder = r->start.recorder;
        r->start.recorder = NULL;
        __atomic_store_n(&regs_used, regs_used - 1, __ATOMIC_RELAXED);
    }
    pthread_mutex_unlock(&gr_mutex);
    return recorder;
}

int ls_sentinel_copy(long handle, unsigned long after, ls_Capture *copies, char *texts) {
    int n = 0;
    pthread_mutex_lock(&gr_mutex);
    Registration *r = registration(handle);
    for (int k = 0; r != NULL && k < KEPT; k++) {
        const ls_Capture *kept = &r->kept[k];
        if (kept->seq == 0 || kept->seq <= after)
            continue;
        copies[n] = *kept;
        copies[n].text = texts + (size_t)n * CAPTURE_BYTES;
        memcpy(copies[n].text, kept->text, kept->used);
        n++;
    }
    pthread_mutex_unlock(&gr_mutex);
    return n;
}

void ls_sentinel_configure(double new_grace, double new_first_report, int to_stderr,
                           char (*rules)[NAME_BYTES], int count) {
    pthread_mutex_lock(&gr_mutex);
    grace = new_grace > 0.0 ? new_grace : 0.025;
    poll = grace / 4;
    first_report = new_first_report > 0.0 ? new_first_report : 1.0;
    stderr_reports = to_stderr;
    n_rules = count < MAX_RULES ? count : MAX_RULES;
    memcpy(file_rules, rules, sizeof(file_rules[0]) * (size_t)n_rules);
    pthread_mutex_unlock(&gr_mutex);
}

#else /* no GIL reader here: the watchdog's wait arms nothing */

void ls_gil_arm(double wait) {
    (void)wait;
}

void ls_gil_disarm(void) {}

#endif /* GIL_READER */
