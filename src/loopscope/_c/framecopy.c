/*
 * Copies of a thread's frames, made without the GIL (see gilreader.h): the thread state,
 * its frames, their code objects, names, file names and line tables are read through
 * process_vm_readv(getpid(), ...), where memory unmapped meanwhile is an error rather than
 * a crash, and each object is checked (its type, its sizes) before it is used.  Nothing is
 * INCREF'd and nothing Python is called.  The layouts are the ones of the interpreter this
 * file is compiled for: its internal headers (the only file of the module that sees them)
 * for the frames of 3.11 to 3.13 and for the GIL's state, the public PyFrameObject of 3.10.
 */
#include "gilreader.h"

#ifdef GIL_READER

#define Py_BUILD_CORE 1
#undef _PyGC_FINALIZED /* a public macro that the internal headers define as a function */
#if PY_VERSION_HEX >= 0x030B0000
#include "internal/pycore_frame.h"
#endif
#include "internal/pycore_interp.h"
#include "internal/pycore_runtime.h"
#undef Py_BUILD_CORE
#if PY_VERSION_HEX < 0x030B0000
#include <frameobject.h>
#endif

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

/* Frames walked at most, and kept at most (the limits of _stacks.format_stack). */
#define WALK_LIMIT 10000
#define KEEP_FRAMES 100
#define OUTER_FRAMES 20
#define LINETABLE_LIMIT (4 * 1024 * 1024)

typedef struct {
    uintptr_t code;
    int index; /* the instruction (code units) */
} WalkedFrame;

/* Scratch memory of the one thread that reads (the sentinel, with its mutex held). */
static WalkedFrame *walked;
static unsigned char *linetable;
static pid_t own_pid;
/* The main interpreter's GIL. */
static const struct _gil_runtime_state *gil;

static int peek(const void *address, void *out, size_t size) {
    struct iovec local = {out, size};
    struct iovec remote = {(void *)address, size};
    return process_vm_readv(own_pid, &local, 1, &remote, 1, 0) == (ssize_t)size ? 0 : -1;
}

/* ---------------------------------------------------------------------------------------
 * Copies of objects, checked before use
 */

static void put_utf8(char *out, size_t *at, size_t cap, Py_UCS4 ch) {
    char tmp[4];
    size_t n;
    if (ch < 0x80) {
        tmp[0] = (char)ch;
        n = 1;
    } else if (ch < 0x800) {
        tmp[0] = (char)(0xC0 | (ch >> 6));
        tmp[1] = (char)(0x80 | (ch & 0x3F));
        n = 2;
    } else if (ch < 0x10000) {
        tmp[0] = (char)(0xE0 | (ch >> 12));
        tmp[1] = (char)(0x80 | ((ch >> 6) & 0x3F));
        tmp[2] = (char)(0x80 | (ch & 0x3F));
        n = 3;
    } else {
        tmp[0] = (char)(0xF0 | (ch >> 18));
        tmp[1] = (char)(0x80 | ((ch >> 12) & 0x3F));
        tmp[2] = (char)(0x80 | ((ch >> 6) & 0x3F));
        tmp[3] = (char)(0x80 | (ch & 0x3F));
        n = 4;
    }
    if (*at + n < cap) {
        memcpy(out + *at, tmp, n);
        *at += n;
    }
}

/* A str object's text as UTF-8 into out (NUL-terminated, cut at cap); -1 if it is not a
 * compact str. */
static int read_str(const void *address, char *out, size_t cap) {
    PyCompactUnicodeObject head;
    if (address == NULL || peek(address, &head, sizeof(PyASCIIObject)) < 0)
        return -1;
    PyASCIIObject *ascii = &head._base;
    if (Py_TYPE((PyObject *)ascii) != &PyUnicode_Type || !ascii->state.compact ||
        ascii->length < 0)
        return -1;
    size_t length = (size_t)ascii->length;
    if (ascii->state.ascii) {
        size_t n = length < cap - 1 ? length : cap - 1;
        if (peek((const char *)address + sizeof(PyASCIIObject), out, n) < 0)
            return -1;
        out[n] = '\0';
        return 0;
    }
    if (peek(address, &head, sizeof(PyCompactUnicodeObject)) < 0)
        return -1;
    unsigned int kind = ascii->state.kind;
    if (kind != 1 && kind != 2 && kind != 4)
        return -1;
    size_t n = length < NAME_BYTES ? length : NAME_BYTES;
    unsigned char raw[NAME_BYTES * 4];
    if (peek((const char *)address + sizeof(PyCompactUnicodeObject), raw, n * kind) < 0)
        return -1;
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        Py_UCS4 ch;
        if (kind == 1)
            ch = raw[i];
        else if (kind == 2)
            ch = ((Py_UCS2 *)raw)[i];
        else
            ch = ((Py_UCS4 *)raw)[i];
        put_utf8(out, &at, cap, ch);
    }
    out[at] = '\0';
    return 0;
}

/* The bytes of a bytes object into `linetable`; their number, or -1. */
static Py_ssize_t read_bytes(const void *address) {
    PyBytesObject head;
    if (address == NULL || peek(address, &head, offsetof(PyBytesObject, ob_sval)) < 0)
        return -1;
    Py_ssize_t size = Py_SIZE((PyObject *)&head);
    if (Py_TYPE((PyObject *)&head) != &PyBytes_Type || size < 0 || size > LINETABLE_LIMIT)
        return -1;
    if (size > 0 &&
        peek((const char *)address + offsetof(PyBytesObject, ob_sval), linetable, (size_t)size) <
            0)
        return -1;
    return size;
}

/* The line of instruction `index` (code units), from a copy of the code's line table, the
 * way PyCode_Addr2Line finds it; -1 for none. */
#if PY_VERSION_HEX >= 0x030B0000
static int read_varint(const unsigned char **p, const unsigned char *end, unsigned int *out) {
    unsigned int value = 0;
    int shift = 0;
    for (;;) {
        if (*p >= end || shift > 28)
            return -1;
        unsigned int byte = *(*p)++;
        value |= (byte & 63) << shift;
        if (!(byte & 64))
            break;
        shift += 6;
    }
    *out = value;
    return 0;
}

static int line_of(const unsigned char *table, Py_ssize_t size, int firstlineno, int index) {
    const unsigned char *p = table, *end = table + size;
    int line = firstlineno, address = 0;
    while (p < end) {
        unsigned int first = *p++;
        if (!(first & 0x80))
            return -1;
        int code = (int)((first >> 3) & 15), length = (int)(first & 7) + 1, delta = 0;
        unsigned int value;
        if (code == 14 || code == 13) {
            if (read_varint(&p, end, &value) < 0)
                return -1;
            delta = (value & 1) ? -(int)(value >> 1) : (int)(value >> 1);
        } else if (code >= 10 && code <= 12) {
            delta = code - 10;
        }
        while (p < end && !(*p & 0x80))
            p++; /* the rest of the entry: columns */
        line += delta;
        if (index < address + length)
            return code == 15 ? -1 : line;
        address += length;
    }
    return -1;
}
#else
static int line_of(const unsigned char *table, Py_ssize_t size, int firstlineno, int index) {
    if (index < 0)
        return firstlineno;
    int target = index * (int)sizeof(_Py_CODEUNIT), start = 0, line = firstlineno;
    for (Py_ssize_t i = 0; i + 1 < size; i += 2) {
        int span = table[i], delta = (signed char)table[i + 1], current;
        if (delta == -128) {
            current = -1;
        } else {
            line += delta;
            current = line;
        }
        if (span > 0 && target < start + span)
            return current;
        start += span;
    }
    return -1;
}
#endif

/* A copy of the code object at `address`, checked; -1 if it is not one. */
static int read_code(uintptr_t address, PyCodeObject *code) {
    if (address == 0 || peek((const void *)address, code, sizeof(PyCodeObject)) < 0)
        return -1;
    return Py_TYPE((PyObject *)code) == &PyCode_Type ? 0 : -1;
}

double ls_read_start(const ls_StartRef *ref) {
    if (ref->start_double != NULL)
        return load_double(ref->start_double);
    if (ref->offset < 0)
        return -1.0;
    uintptr_t value;
    PyFloatObject number;
    if (peek((const char *)ref->recorder + ref->offset, &value, sizeof(value)) < 0 ||
        value == 0 || peek((const void *)value, &number, sizeof(number)) < 0 ||
        Py_TYPE((PyObject *)&number) != &PyFloat_Type)
        return -1.0;
    return number.ob_fval;
}

/* ---------------------------------------------------------------------------------------
 * Walking a thread's frames
 */

/* The innermost frame of `tstate` and its instruction pointer (the fingerprint), or -1. */
static int innermost(PyThreadState *tstate, uintptr_t *frame, uintptr_t *instr) {
#if PY_VERSION_HEX >= 0x030D0000
    if (peek((const char *)tstate + offsetof(PyThreadState, current_frame), frame,
             sizeof(*frame)) < 0)
        return -1;
    *instr = 0;
    return *frame == 0 ? 0
                       : peek((const char *)*frame + offsetof(_PyInterpreterFrame, instr_ptr),
                              instr, sizeof(*instr));
#elif PY_VERSION_HEX >= 0x030B0000
    uintptr_t cframe;
    if (peek((const char *)tstate + offsetof(PyThreadState, cframe), &cframe, sizeof(cframe)) <
            0 ||
        cframe == 0 ||
        peek((const char *)cframe + offsetof(_PyCFrame, current_frame), frame, sizeof(*frame)) <
            0)
        return -1;
    *instr = 0;
    return *frame == 0 ? 0
                       : peek((const char *)*frame + offsetof(_PyInterpreterFrame, prev_instr),
                              instr, sizeof(*instr));
#else
    if (peek((const char *)tstate + offsetof(PyThreadState, frame), frame, sizeof(*frame)) < 0)
        return -1;
    int lasti = 0;
    *instr = 0;
    if (*frame != 0 &&
        peek((const char *)*frame + offsetof(PyFrameObject, f_lasti), &lasti, sizeof(lasti)) < 0)
        return -1;
    *instr = (uintptr_t)(unsigned int)lasti;
    return 0;
#endif
}

/* Walk from the innermost frame outwards into `walked`: the number of frames, -1 when a
 * read fails or finds something that is not a frame of code (the stack moved); *more when
 * the walk stopped before the outermost frame. */
static int walk(uintptr_t frame, int *more) {
    int n = 0, steps = 0;
    *more = 0;
    while (frame != 0) {
        if (n >= WALK_LIMIT) {
            *more = 1;
            break;
        }
        /* Frames that are not shown (C entry shims, frames of no code) do not count in n:
         * a moving stack can chain them into a loop, so every frame visited counts here.
         * A real stack has at most one such frame beside each shown one. */
        if (++steps > 2 * WALK_LIMIT + 2)
            return -1;
        PyCodeObject code;
#if PY_VERSION_HEX >= 0x030B0000
        _PyInterpreterFrame f;
        if (peek((const void *)frame, &f, offsetof(_PyInterpreterFrame, localsplus)) < 0)
            return -1;
#if PY_VERSION_HEX >= 0x030D0000
        uintptr_t code_address = (uintptr_t)f.f_executable;
        uintptr_t instr = (uintptr_t)f.instr_ptr;
#else
        uintptr_t code_address = (uintptr_t)f.f_code;
        uintptr_t instr = (uintptr_t)f.prev_instr;
#endif
        int skip = 0;
#if PY_VERSION_HEX >= 0x030C0000
        skip = f.owner == FRAME_OWNED_BY_CSTACK; /* a C entry shim */
#endif
        if (!skip) {
            if (read_code(code_address, &code) < 0) {
#if PY_VERSION_HEX >= 0x030D0000
                skip = 1; /* f_executable need not be code */
#else
                return -1;
#endif
            }
        }
        if (!skip) {
            uintptr_t first = code_address + offsetof(PyCodeObject, co_code_adaptive);
            Py_ssize_t units = Py_SIZE((PyObject *)&code);
            if (instr < first || (instr - first) % sizeof(_Py_CODEUNIT) != 0)
                return -1;
            Py_ssize_t index = (Py_ssize_t)((instr - first) / sizeof(_Py_CODEUNIT));
            if (index >= units)
                return -1;
            /* An incomplete frame (not started yet) is not shown, as in sys._current_frames(). */
            if (!(f.owner != FRAME_OWNED_BY_GENERATOR && index < code._co_firsttraceable)) {
                walked[n].code = code_address;
                walked[n].index = (int)index;
                n++;
            }
        }
        frame = (uintptr_t)f.previous;
#else
        PyFrameObject f;
        if (peek((const void *)frame, &f, sizeof(f)) < 0 ||
            read_code((uintptr_t)f.f_code, &code) < 0)
            return -1;
        walked[n].code = (uintptr_t)f.f_code;
        walked[n].index = f.f_lasti;
        n++;
        frame = (uintptr_t)f.f_back;
#endif
    }
    return n;
}

/* Append one entry "path:line in name" for walked frame `i` to `capture`; -1 if its code
 * cannot be read. */
static int add_entry(ls_Capture *capture, const WalkedFrame *frame) {
    PyCodeObject code;
    char filename[NAME_BYTES], name[NAME_BYTES];
    if (read_code(frame->code, &code) < 0 || read_str(code.co_filename, filename, NAME_BYTES) < 0 ||
        read_str(code.co_name, name, NAME_BYTES) < 0)
        return -1;
    Py_ssize_t size = read_bytes(code.co_linetable);
    if (size < 0)
        return -1;
    int line = line_of(linetable, size, code.co_firstlineno, frame->index);
    char number[16];
    if (line < 0)
        strcpy(number, "None");
    else
        snprintf(number, sizeof(number), "%d", line);
    int n = snprintf(capture->text + capture->used, CAPTURE_BYTES - capture->used,
                     "%s:%s in %s", filename, number, name);
    if (n < 0 || (size_t)n >= CAPTURE_BYTES - capture->used)
        return -1;
    capture->used += (size_t)n + 1;
    capture->entries++;
    return 0;
}

static int add_text(ls_Capture *capture, const char *text) {
    size_t n = strlen(text);
    if (n + 1 > CAPTURE_BYTES - capture->used)
        return -1;
    memcpy(capture->text + capture->used, text, n + 1);
    capture->used += n + 1;
    capture->entries++;
    return 0;
}

int ls_read_stack(PyThreadState *tstate, unsigned long thread_id, const ls_StartRef *start,
                  ls_Capture *capture) {
    double start_before = ls_read_start(start);
    uintptr_t frame, instr, frame_after, instr_after;
    unsigned long owner;
    if (peek((const char *)tstate + offsetof(PyThreadState, thread_id), &owner, sizeof(owner)) <
            0 ||
        owner != thread_id || innermost(tstate, &frame, &instr) < 0 || frame == 0)
        return -1;
    int more;
    int n = walk(frame, &more);
    if (n <= 0)
        return -1;
    capture->entries = 0;
    capture->used = 0;
    if (n <= KEEP_FRAMES) {
        for (int i = n - 1; i >= 0; i--)
            if (add_entry(capture, &walked[i]) < 0)
                return -1;
    } else {
        char marker[64];
        for (int i = n - 1; i >= n - OUTER_FRAMES; i--)
            if (add_entry(capture, &walked[i]) < 0)
                return -1;
        snprintf(marker, sizeof(marker), "... (%d%s frames left out) ...", n - KEEP_FRAMES,
                 more ? "+" : "");
        if (add_text(capture, marker) < 0)
            return -1;
        for (int i = KEEP_FRAMES - OUTER_FRAMES - 1; i >= 0; i--)
            if (add_entry(capture, &walked[i]) < 0)
                return -1;
    }
    double start_after = ls_read_start(start);
    if (innermost(tstate, &frame_after, &instr_after) < 0 || frame_after != frame ||
        instr_after != instr || start_after != start_before)
        return -1;
    capture->step_start = start_before > 0.0 ? start_before : 0.0;
    return 0;
}

int ls_gil_holder(uintptr_t *holder, unsigned long *switches) {
    struct _gil_runtime_state state;
    if (peek(gil, &state, offsetof(struct _gil_runtime_state, switch_number) +
                              sizeof(state.switch_number)) < 0)
        return -1;
#if PY_VERSION_HEX >= 0x030D0000
    *holder = (uintptr_t)state.last_holder;
    int locked = state.locked;
#else
    *holder = state.last_holder._value;
    int locked = state.locked._value;
#endif
    *switches = state.switch_number;
    return locked != 0;
}

const char *ls_framecopy_init(void) {
    own_pid = getpid();
#if PY_VERSION_HEX >= 0x030C0000
    gil = PyInterpreterState_Get()->ceval.gil;
#else
    gil = &_PyRuntime.ceval.gil;
#endif
    walked = malloc(sizeof(WalkedFrame) * WALK_LIMIT);
    linetable = malloc(LINETABLE_LIMIT);
    if (walked == NULL || linetable == NULL)
        return "out of memory";
    volatile long probe_value = 0x5eed;
    long copy = 0;
    if (peek((const void *)&probe_value, &copy, sizeof(copy)) < 0 || copy != 0x5eed)
        return errno == EPERM || errno == ENOSYS
                   ? "process_vm_readv is refused here (seccomp or a sandbox)"
                   : "process_vm_readv does not work here";
    return NULL;
}

void ls_framecopy_after_fork(void) {
    own_pid = getpid();
}

#endif /* GIL_READER */
