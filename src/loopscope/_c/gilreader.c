/*
 * The module loopscope._speedups.gil_reader: the GIL reader's Python side (see
 * gilreader.h), called with the GIL.  loopscope._gilreader is its one user.
 */
#include "gilreader.h"

#include <stdlib.h>
#include <string.h>

/* NULL while the reader works here, else why it does not. */
static const char *reader_off = "not built for this platform or Python version";
/* Cleared by _forget_layout(True): act as on an interpreter whose layout is not known. */
static int layout_known = 1;

static PyObject *gr_status(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a)) {
    if (!layout_known)
        return PyUnicode_FromString("the frame layout of this Python is not known");
    return PyUnicode_FromString(reader_off == NULL ? "on" : reader_off);
}

#ifdef GIL_READER
/* Where `recorder` keeps its step start: a C recorder's double, or a pure one's
 * current_start slot (its offset in the object), else not known. */
static void find_start(PyObject *recorder, ls_StartRef *ref) {
    ref->start_double = NULL;
    ref->recorder = recorder;
    ref->offset = -1;
    if (Py_IS_TYPE(recorder, &ls_Recorder_Type)) {
        ref->start_double = ((Recorder *)recorder)->start;
        return;
    }
    PyObject *descr = PyObject_GetAttrString((PyObject *)Py_TYPE(recorder), "current_start");
    if (descr == NULL) {
        PyErr_Clear();
        return;
    }
    if (Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
        PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
        if (member->type == T_OBJECT_EX || member->type == T_OBJECT)
            ref->offset = member->offset;
    }
    Py_DECREF(descr);
}
#endif

/* register(recorder, label) -> handle, or -1 when the reader is off or full. */
static PyObject *gr_register(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyUnicode_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "register(recorder, label: str)");
        return NULL;
    }
#ifdef GIL_READER
    if (reader_off != NULL || !layout_known)
        return PyLong_FromLong(-1);
    const char *label = PyUnicode_AsUTF8(args[1]);
    if (label == NULL)
        return NULL;
    ls_StartRef start;
    find_start(args[0], &start);
    PyThreadState *tstate = PyThreadState_Get();
    char *texts = malloc(KEPT * CAPTURE_BYTES);
    if (texts == NULL)
        return PyErr_NoMemory();
    Py_INCREF(args[0]); /* the registration's */
    long handle;
    Py_BEGIN_ALLOW_THREADS
    handle = ls_sentinel_add(tstate, &start, label, texts);
    Py_END_ALLOW_THREADS
    if (handle < 0) {
        Py_DECREF(args[0]);
        free(texts);
    }
    return PyLong_FromLong(handle);
#else
    return PyLong_FromLong(-1);
#endif
}

/* unregister(handle): the reader never reads that thread again once this returns. */
static PyObject *gr_unregister(PyObject *Py_UNUSED(m), PyObject *arg) {
    long handle = PyLong_AsLong(arg);
    if (handle == -1 && PyErr_Occurred())
        return NULL;
#ifdef GIL_READER
    const void *recorder;
    Py_BEGIN_ALLOW_THREADS
    recorder = ls_sentinel_remove(handle);
    Py_END_ALLOW_THREADS
    Py_XDECREF((PyObject *)recorder);
#endif
    Py_RETURN_NONE;
}

#ifdef GIL_READER
static PyObject *capture_tuple(const ls_Capture *capture) {
    PyObject *entries = PyList_New(capture->entries);
    if (entries == NULL)
        return NULL;
    const char *p = capture->text;
    for (int e = 0; e < capture->entries; e++) {
        size_t length = strlen(p);
        PyObject *entry = PyUnicode_DecodeUTF8(p, (Py_ssize_t)length, "replace");
        if (entry == NULL) {
            Py_DECREF(entries);
            return NULL;
        }
        PyList_SET_ITEM(entries, e, entry);
        p += length + 1;
    }
    return Py_BuildValue("(kddN)", capture->seq, capture->step_start, capture->captured_at,
                         entries);
}
#endif

/* captures(handle, after) -> [(seq, step_start, captured_at, [entries])]: the stacks read
 * while the thread held the GIL, newer than capture `after`. */
static PyObject *gr_captures(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "captures(handle, after)");
        return NULL;
    }
    long handle = PyLong_AsLong(args[0]);
    unsigned long after = PyLong_AsUnsignedLong(args[1]);
    if (PyErr_Occurred())
        return NULL;
    PyObject *result = PyList_New(0);
    if (result == NULL)
        return NULL;
#ifdef GIL_READER
    if (ls_sentinel_registered() == 0)
        return result;
    ls_Capture copies[KEPT];
    char *texts = malloc(KEPT * CAPTURE_BYTES);
    if (texts == NULL) {
        Py_DECREF(result);
        return PyErr_NoMemory();
    }
    int n;
    Py_BEGIN_ALLOW_THREADS
    n = ls_sentinel_copy(handle, after, copies, texts);
    Py_END_ALLOW_THREADS
    for (int k = 0; k < n; k++) {
        PyObject *item = capture_tuple(&copies[k]);
        if (item == NULL || PyList_Append(result, item) < 0) {
            Py_XDECREF(item);
            Py_CLEAR(result);
            break;
        }
        Py_DECREF(item);
    }
    free(texts);
#endif
    return result;
}

/* arm(wait) / disarm(): around a wait of the watchdog's in Python. */
static PyObject *gr_arm(PyObject *Py_UNUSED(m), PyObject *arg) {
    double wait = PyFloat_AsDouble(arg);
    if (wait == -1.0 && PyErr_Occurred())
        return NULL;
#ifdef GIL_READER
    Py_BEGIN_ALLOW_THREADS
    ls_gil_arm(wait);
    Py_END_ALLOW_THREADS
#endif
    Py_RETURN_NONE;
}

static PyObject *gr_disarm(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a)) {
    ls_gil_disarm();
    Py_RETURN_NONE;
}

/* configure(grace, first_report, stderr_reports, file_rules) */
static PyObject *gr_configure(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || !PyTuple_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError,
                        "configure(grace, first_report, stderr_reports, file_rules: tuple)");
        return NULL;
    }
    double grace = PyFloat_AsDouble(args[0]), first_report = PyFloat_AsDouble(args[1]);
    int to_stderr = PyObject_IsTrue(args[2]);
    if (PyErr_Occurred())
        return NULL;
#ifdef GIL_READER
    char(*rules)[NAME_BYTES] = calloc(MAX_RULES, NAME_BYTES);
    if (rules == NULL)
        return PyErr_NoMemory();
    int count = 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(args[3]) && count < MAX_RULES; i++) {
        Py_ssize_t size;
        const char *text = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(args[3], i), &size);
        if (text == NULL) {
            free(rules);
            return NULL;
        }
        if (size >= 2 && size < NAME_BYTES)
            memcpy(rules[count++], text, (size_t)size + 1);
    }
    Py_BEGIN_ALLOW_THREADS
    ls_sentinel_configure(grace, first_report, to_stderr, rules, count);
    Py_END_ALLOW_THREADS
    free(rules);
#else
    (void)grace, (void)first_report, (void)to_stderr;
#endif
    Py_RETURN_NONE;
}

static PyObject *gr_registered(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a)) {
#ifdef GIL_READER
    return PyLong_FromLong(ls_sentinel_registered());
#else
    return PyLong_FromLong(0);
#endif
}

/* _forget_layout(flag): act as on an interpreter whose layout is not known (tests). */
static PyObject *gr_forget_layout(PyObject *Py_UNUSED(m), PyObject *arg) {
    int flag = PyObject_IsTrue(arg);
    if (flag < 0)
        return NULL;
    layout_known = !flag;
    Py_RETURN_NONE;
}

static PyMethodDef gil_reader_methods[] = {
    {"status", gr_status, METH_NOARGS,
     "status($module, /)\n--\n\n\"on\", or why the GIL reader is off."},
    {"register", (PyCFunction)(void (*)(void))gr_register, METH_FASTCALL,
     "register($module, recorder, label, /)\n--\n\n"
     "Register the calling (loop) thread; a handle, or -1 when the reader is off."},
    {"unregister", gr_unregister, METH_O,
     "unregister($module, handle, /)\n--\n\nThe thread of `handle` is never read again."},
    {"captures", (PyCFunction)(void (*)(void))gr_captures, METH_FASTCALL,
     "captures($module, handle, after, /)\n--\n\n"
     "[(seq, step_start, captured_at, stack)] read since capture `after`."},
    {"arm", gr_arm, METH_O,
     "arm($module, wait, /)\n--\n\nThe watchdog will want the GIL in `wait` seconds."},
    {"disarm", gr_disarm, METH_NOARGS, "disarm($module, /)\n--\n\nThe watchdog has the GIL."},
    {"configure", (PyCFunction)(void (*)(void))gr_configure, METH_FASTCALL,
     "configure($module, grace, first_report, stderr_reports, file_rules, /)\n--\n\n"
     "The reader's settings."},
    {"registered", gr_registered, METH_NOARGS,
     "registered($module, /)\n--\n\nThe number of threads registered now."},
    {"_forget_layout", gr_forget_layout, METH_O,
     "_forget_layout($module, flag, /)\n--\n\nAct as on an unknown interpreter (tests)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef gil_reader_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "loopscope._speedups.gil_reader",
    .m_doc = "Stacks of loop threads that hold the GIL in one long C call, read while it "
             "lasts.",
    .m_size = -1,
    .m_methods = gil_reader_methods,
};

PyObject *ls_gil_reader_module(void) {
#ifdef GIL_READER
    reader_off = ls_framecopy_init();
    if (reader_off == NULL && ls_sentinel_init() < 0)
        reader_off = "the sentinel's condition variable cannot be set up";
#endif
    return PyModule_Create(&gil_reader_module);
}
