/*
 * loopscope._speedups.Engine: the socket work of the /metrics endpoint, done without the GIL.
 *
 * The endpoint's thread calls Engine.run(), which releases the GIL and then accepts, reads,
 * writes and closes connections with poll(2) over non-blocking sockets.  It takes the GIL
 * back only to ask Python for an answer: the Python callable `respond(head)` gets a request
 * head (the bytes before the blank line, or None when the head grew past max_head) and
 * returns (answer, fresh_for): the whole response, and how many seconds the same head may be
 * given the same bytes again.  Within that time, a request whose head is byte for byte the
 * same (Prometheus sends the same head on every scrape, Authorization included) is answered
 * from a copy kept here, without Python: a busy event loop, which holds the GIL, is then not
 * interrupted by scrapes at all, only by the builds of the exposition (a few a second).
 *
 * Every decision about a request (what is served, authentication, errors) stays in Python;
 * this file knows nothing of HTTP except where a head ends.  Everything here is touched by
 * the serving thread only, except `stopping`, which stop() sets from any thread.
 */

#include "speedups.h" /* and clock.h: clock_gettime_seconds(), no GIL needed */

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0
#endif

#define CACHE_SLOTS 8
#define READ_CHUNK 4096
/* Connections accepted per turn of the loop: a burst of scrapers is taken in quickly, and a
 * flood of them still lets the open ones move on. */
#define ACCEPTS_PER_TURN 16

/* An answer being written, shared by the cache and the connections writing it. */
typedef struct {
    size_t refs;
    size_t len;
    char data[];
} Blob;

typedef struct {
    char *head; /* NULL: the slot is free */
    size_t head_len;
    Blob *answer;
    double until;
} Entry;

typedef struct {
    int fd;
    short events; /* POLLIN while reading the request, POLLOUT while writing the answer */
    double deadline;
    char *inbox;
    size_t inlen;
    Blob *out; /* NULL while the request is read */
    size_t sent;
} Conn;

typedef struct {
    PyObject_HEAD
    int listener;
    int wake;
    PyObject *respond;
    double timeout;
    Py_ssize_t max_connections;
    Py_ssize_t max_head;
    Conn *conns;
    Py_ssize_t nconns;
    struct pollfd *fds;
    Entry cache[CACHE_SLOTS];
    int next_slot;
    int running;
    int stopping; /* read and written with __atomic builtins */
} Engine;

static Blob *blob_new(const char *data, size_t len) {
    Blob *blob = malloc(sizeof(Blob) + len);
    if (blob != NULL) {
        blob->refs = 1;
        blob->len = len;
        memcpy(blob->data, data, len);
    }
    return blob;
}

static void blob_release(Blob *blob) {
    if (blob != NULL && --blob->refs == 0)
        free(blob);
}

/* --- the answer cache ----------------------------------------------------------------- */

static void entry_clear(Entry *entry) {
    free(entry->head);
    entry->head = NULL;
    blob_release(entry->answer);
    entry->answer = NULL;
}

static Blob *cache_find(Engine *self, const char *head, size_t len, double now) {
    for (int i = 0; i < CACHE_SLOTS; i++) {
        Entry *entry = &self->cache[i];
        if (entry->head != NULL && entry->head_len == len && entry->until > now &&
            memcmp(entry->head, head, len) == 0) {
            entry->answer->refs++;
            return entry->answer;
        }
    }
    return NULL;
}

static void cache_store(Engine *self, const char *head, size_t len, Blob *answer, double until) {
    Entry *slot = NULL;
    for (int i = 0; i < CACHE_SLOTS && slot == NULL; i++) {
        Entry *entry = &self->cache[i];
        if (entry->head != NULL && entry->head_len == len && memcmp(entry->head, head, len) == 0)
            slot = entry; /* the same head: its answer is replaced */
    }
    for (int i = 0; i < CACHE_SLOTS && slot == NULL; i++) {
        if (self->cache[i].head == NULL)
            slot = &self->cache[i];
    }
    if (slot == NULL) {
        slot = &self->cache[self->next_slot];
        self->next_slot = (self->next_slot + 1) % CACHE_SLOTS;
    }
    char *copy = malloc(len ? len : 1);
    if (copy == NULL)
        return; /* not kept: the next scrape asks Python again */
    memcpy(copy, head, len);
    entry_clear(slot);
    slot->head = copy;
    slot->head_len = len;
    slot->answer = answer;
    answer->refs++;
    slot->until = until;
}

/* --- connections ---------------------------------------------------------------------- */

static void conn_close(Engine *self, Py_ssize_t i) {
    Conn *conn = &self->conns[i];
    close(conn->fd);
    free(conn->inbox);
    blob_release(conn->out);
    self->conns[i] = self->conns[--self->nconns];
}

/* Python's answer to `head` (NULL: too large), or NULL when it could not be had.  Called
 * without the GIL; takes it for the call. */
static Blob *ask_python(Engine *self, PyThreadState **ts, const char *head, size_t len) {
    Blob *blob = NULL;
    PyEval_RestoreThread(*ts);
    PyObject *arg = head != NULL ? PyBytes_FromStringAndSize(head, (Py_ssize_t)len) : Py_NewRef(Py_None);
    PyObject *result = arg != NULL ? PyObject_CallOneArg(self->respond, arg) : NULL;
    Py_XDECREF(arg);
    if (result != NULL) {
        PyObject *answer = NULL;
        double fresh_for = 0.0;
        if (!PyTuple_Check(result) ||
            !PyArg_ParseTuple(result, "Sd", &answer, &fresh_for)) {
            PyErr_Format(PyExc_TypeError, "respond() must return (bytes, float), not %.100R",
                         result);
            Py_DECREF(result);
            result = NULL;
        }
        else {
            blob = blob_new(PyBytes_AS_STRING(answer), (size_t)PyBytes_GET_SIZE(answer));
            if (blob != NULL && head != NULL && fresh_for > 0.0)
                cache_store(self, head, len, blob, clock_gettime_seconds() + fresh_for);
            Py_DECREF(result);
        }
    }
    if (result == NULL && PyErr_Occurred())
        PyErr_WriteUnraisable(self->respond); /* that connection is dropped, serving goes on */
    *ts = PyEval_SaveThread();
    return blob;
}

/* Write what is left of the answer; closes the connection when it is all written or on an
 * error.  Returns 1 when the connection was closed. */
static int conn_write(Engine *self, Py_ssize_t i, double now) {
    Conn *conn = &self->conns[i];
    while (conn->sent < conn->out->len) {
        ssize_t n = send(conn->fd, conn->out->data + conn->sent, conn->out->len - conn->sent,
                         MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                conn->events = POLLOUT;
                return 0;
            }
            break;
        }
        conn->sent += (size_t)n;
        conn->deadline = now + self->timeout;
    }
    if (conn->sent == conn->out->len) {
        /* What the client sent beyond the head (a body, the rest of an oversized head) is
         * read and dropped: closing with unread input would reset the connection, and the
         * client could lose the answer. */
        char sink[READ_CHUNK];
        for (int k = 0; k < 64 && recv(conn->fd, sink, sizeof sink, 0) > 0; k++) {
        }
    }
    conn_close(self, i);
    return 1;
}

/* Read what has come; once the head is complete, find its answer and start writing. */
static void conn_progress(Engine *self, Py_ssize_t i, PyThreadState **ts, double now) {
    Conn *conn = &self->conns[i];
    if (conn->out != NULL) {
        conn_write(self, i, now);
        return;
    }
    size_t capacity = (size_t)self->max_head + 4; /* the head and its blank line */
    if (conn->inbox == NULL) {
        conn->inbox = malloc(capacity);
        if (conn->inbox == NULL) {
            conn_close(self, i);
            return;
        }
    }
    for (;;) {
        size_t space = capacity - conn->inlen;
        size_t chunk = space < READ_CHUNK ? space : READ_CHUNK;
        ssize_t n = recv(conn->fd, conn->inbox + conn->inlen, chunk, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                conn->events = POLLIN;
                return;
            }
            conn_close(self, i);
            return;
        }
        if (n == 0) { /* the client went away before its request was complete */
            conn_close(self, i);
            return;
        }
        size_t from = conn->inlen >= 3 ? conn->inlen - 3 : 0;
        conn->inlen += (size_t)n;
        const char *end = NULL;
        for (size_t k = from; k + 4 <= conn->inlen; k++) {
            if (memcmp(conn->inbox + k, "\r\n\r\n", 4) == 0) {
                end = conn->inbox + k;
                break;
            }
        }
        if (end == NULL && conn->inlen < capacity)
            continue;
        const char *head = end != NULL ? conn->inbox : NULL;
        size_t len = end != NULL ? (size_t)(end - conn->inbox) : 0;
        Blob *answer = head != NULL ? cache_find(self, head, len, now) : NULL;
        if (answer == NULL) {
            answer = ask_python(self, ts, head, len);
            now = clock_gettime_seconds();
        }
        /* ask_python() may have run for a while, but nothing else touched the connections. */
        conn = &self->conns[i];
        if (answer == NULL) {
            conn_close(self, i);
            return;
        }
        free(conn->inbox);
        conn->inbox = NULL;
        conn->inlen = 0;
        conn->out = answer;
        conn->sent = 0;
        conn->deadline = now + self->timeout;
        conn_write(self, i, now);
        return;
    }
}

static int accept_nonblocking(int listener) {
#ifdef SOCK_NONBLOCK
    return accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
#else
    int fd = accept(listener, NULL, NULL);
    if (fd >= 0 && (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) < 0 ||
                    fcntl(fd, F_SETFD, FD_CLOEXEC) < 0)) {
        close(fd);
        return -1;
    }
    return fd;
#endif
}

/* Accept one connection and serve it as far as it goes; 0 when there was none to accept. */
static int accept_one(Engine *self, PyThreadState **ts, double now) {
    int fd = accept_nonblocking(self->listener);
    if (fd < 0)
        return 0; /* nothing waiting, or a failed accept (the client sees it closed) */
    if (self->nconns >= self->max_connections) {
        close(fd);
        return 1;
    }
    Py_ssize_t i = self->nconns++;
    self->conns[i] = (Conn){.fd = fd, .events = POLLIN, .deadline = now + self->timeout};
    /* The request is usually there already: no round through poll() for it. */
    conn_progress(self, i, ts, now);
    return 1;
}

/* The loop of run(): returns 0 when woken or stopped, else an errno value. */
static int serve(Engine *self, PyThreadState **ts) {
    for (;;) {
        if (__atomic_load_n(&self->stopping, __ATOMIC_ACQUIRE))
            return 0;
        double now = clock_gettime_seconds();
        struct pollfd *fds = self->fds;
        fds[0] = (struct pollfd){.fd = self->wake, .events = POLLIN};
        fds[1] = (struct pollfd){.fd = self->listener, .events = POLLIN};
        int timeout_ms = -1;
        for (Py_ssize_t i = 0; i < self->nconns; i++) {
            fds[2 + i] = (struct pollfd){.fd = self->conns[i].fd, .events = self->conns[i].events};
            double left = self->conns[i].deadline - now;
            int ms = left <= 0 ? 0 : (int)(left * 1000.0) + 1;
            if (timeout_ms < 0 || ms < timeout_ms)
                timeout_ms = ms;
        }
        Py_ssize_t polled = self->nconns;
        int ready = poll(fds, (nfds_t)(2 + polled), timeout_ms);
        if (ready < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (fds[0].revents) {
            char drain[64];
            while (read(self->wake, drain, sizeof drain) > 0) {
            }
            return 0;
        }
        now = clock_gettime_seconds();
        /* From the last to the first: closing connection i moves the last one into its
         * place, which has been seen to already. */
        for (Py_ssize_t i = polled - 1; i >= 0; i--) {
            if (fds[2 + i].revents)
                conn_progress(self, i, ts, now);
        }
        /* After a question to Python, the listener is looked at only if the endpoint is
         * not stopping: a stopped endpoint may have closed it, and its number reused. */
        for (int k = 0; k < ACCEPTS_PER_TURN && (fds[1].revents & POLLIN) &&
                        !__atomic_load_n(&self->stopping, __ATOMIC_ACQUIRE);
             k++) {
            if (!accept_one(self, ts, now))
                break;
        }
        now = clock_gettime_seconds();
        for (Py_ssize_t i = self->nconns - 1; i >= 0; i--) {
            if (self->conns[i].deadline <= now)
                conn_close(self, i);
        }
    }
}

/* --- the Python type -------------------------------------------------------------------- */

static void engine_clear_state(Engine *self) {
    while (self->nconns > 0)
        conn_close(self, self->nconns - 1);
    for (int i = 0; i < CACHE_SLOTS; i++)
        entry_clear(&self->cache[i]);
}

static PyObject *Engine_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"listener", "wake",           "respond", "timeout",
                             "max_connections", "max_head", NULL};
    int listener, wake;
    PyObject *respond;
    double timeout;
    Py_ssize_t max_connections, max_head;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiOdnn:Engine", kwlist, &listener, &wake,
                                     &respond, &timeout, &max_connections, &max_head))
        return NULL;
    if (!PyCallable_Check(respond)) {
        PyErr_SetString(PyExc_TypeError, "Engine: respond must be callable");
        return NULL;
    }
    if (max_connections < 1 || max_connections > 65536 || max_head < 1 ||
        max_head > (1 << 24) || !(timeout > 0)) {
        PyErr_SetString(PyExc_ValueError,
                        "Engine: max_connections, max_head and timeout must be positive");
        return NULL;
    }
    Engine *self = (Engine *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->listener = listener;
    self->wake = wake;
    self->respond = Py_NewRef(respond);
    self->timeout = timeout;
    self->max_connections = max_connections;
    self->max_head = max_head;
    self->conns = PyMem_RawCalloc((size_t)max_connections, sizeof(Conn));
    self->fds = PyMem_RawCalloc((size_t)max_connections + 2, sizeof(struct pollfd));
    if (self->conns == NULL || self->fds == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    return (PyObject *)self;
}

#define ENGINE_FIELDS(X) X(respond)
LS_GC_FUNCTIONS(Engine, ENGINE_FIELDS)

static void Engine_dealloc(Engine *self) {
    PyObject_GC_UnTrack(self);
    Engine_clear(self);
    if (self->conns != NULL)
        engine_clear_state(self);
    PyMem_RawFree(self->conns);
    PyMem_RawFree(self->fds);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Engine_run(Engine *self, PyObject *Py_UNUSED(ignored)) {
    if (self->running) {
        PyErr_SetString(PyExc_RuntimeError, "Engine.run() is already running");
        return NULL;
    }
    if (self->respond == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Engine.run(): the engine was cleared");
        return NULL;
    }
    self->running = 1;
    Py_INCREF(self);
    PyThreadState *ts = PyEval_SaveThread();
    int error = serve(self, &ts);
    PyEval_RestoreThread(ts);
    self->running = 0;
    Py_DECREF(self);
    if (error != 0) {
        errno = error;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *Engine_stop(Engine *self, PyObject *Py_UNUSED(ignored)) {
    __atomic_store_n(&self->stopping, 1, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

static PyObject *Engine_close_all(Engine *self, PyObject *Py_UNUSED(ignored)) {
    if (self->running) {
        PyErr_SetString(PyExc_RuntimeError, "Engine.close_all() while run() is running");
        return NULL;
    }
    engine_clear_state(self);
    Py_RETURN_NONE;
}

static PyObject *Engine_get_connections(Engine *self, void *Py_UNUSED(closure)) {
    /* Read while run() may be changing it (tests poll it): a snapshot, good for a moment. */
    return PyLong_FromSsize_t(__atomic_load_n(&self->nconns, __ATOMIC_RELAXED));
}

static PyMethodDef Engine_methods[] = {
    {"run", (PyCFunction)Engine_run, METH_NOARGS,
     "run($self, /)\n--\n\nServe until the wake descriptor is readable or stop() was called (the GIL is released "
     "meanwhile)."},
    {"stop", (PyCFunction)Engine_stop, METH_NOARGS,
     "stop($self, /)\n--\n\nMake run() return at its next turn (write to the wake descriptor to make it prompt)."},
    {"close_all", (PyCFunction)Engine_close_all, METH_NOARGS,
     "close_all($self, /)\n--\n\nClose every open connection and forget the kept answers."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Engine_getset[] = {
    {"connections", (getter)Engine_get_connections, NULL, "Connections open.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject ls_Engine_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopscope._speedups.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Engine(listener, wake, respond, timeout, max_connections, max_head)\n--\n\n"
              "The socket work of the /metrics endpoint, without the GIL.",
    .tp_new = Engine_new,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_traverse = (traverseproc)Engine_traverse,
    .tp_clear = (inquiry)Engine_clear,
    .tp_methods = Engine_methods,
    .tp_getset = Engine_getset,
};
