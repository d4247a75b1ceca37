/*
 * loopscope._speedups: the module (see speedups.h for what each file holds).  Its init
 * interns the attribute names, sets up the recorder (with the bucket bounds of
 * loopscope._stats), the native clock and the watchdog's condition variable, and readies
 * the types.
 */
#include "speedups.h"

ls_names ls_str;
PyObject *ls_empty_tuple;

void ls_gc_dealloc(PyObject *self) {
    PyObject_GC_UnTrack(self);
    Py_TYPE(self)->tp_clear(self);
    Py_TYPE(self)->tp_free(self);
}

static int intern_names(void) {
    static const struct {
        PyObject **slot;
        const char *text;
    } names[] = {
        {&ls_str.callback_duration, "callback_duration"},
        {&ls_str.schedule_delay, "schedule_delay"},
        {&ls_str.counts, "counts"},
        {&ls_str.total, "total"},
        {&ls_str.busy_seconds, "busy_seconds"},
        {&ls_str.task_steps, "task_steps"},
        {&ls_str.tasks_created, "tasks_created"},
        {&ls_str.self, "__self__"},
        {&ls_str.callback, "_callback"},
        {&ls_str.fault, "fault"},
        {&ls_str.context, "context"},
        {&ls_str.record_slow, "record_slow"},
        {&ls_str.offer_exemplar, "offer_exemplar"},
        {&ls_str.active, "active"},
        {&ls_str.context_slot, "_context"},
        {&ls_str.args, "_args"},
        {&ls_str.run, "run"},
        {&ls_str.poll, "poll"},
        {&ls_str.control, "control"},
        {&ls_str.source_traceback, "_source_traceback"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        *names[i].slot = PyUnicode_InternFromString(names[i].text);
        if (*names[i].slot == NULL)
            return -1;
    }
    return 0;
}

/* The histograms' bucket bounds, from the one place they are kept: loopscope._stats.BUCKETS
 * (_stats imports nothing of loopscope's, so importing it from here makes no cycle).  A
 * new reference, or NULL with ImportError set. */
static PyObject *import_bounds(void) {
    PyObject *stats = PyImport_ImportModule("loopscope._stats");
    if (stats == NULL)
        return NULL;
    PyObject *bounds = PyObject_GetAttrString(stats, "BUCKETS");
    Py_DECREF(stats);
    if (bounds == NULL && PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ImportError,
                        "loopscope._speedups: loopscope._stats has no BUCKETS");
    }
    return bounds;
}

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "loopscope._speedups",
    .m_doc = "C accelerator for loopscope's per-callback hot path (optional).",
    .m_size = -1,
    .m_methods = ls_watch_methods,
};

PyMODINIT_FUNC PyInit__speedups(void) {
    if (intern_names() < 0)
        return NULL;
    ls_empty_tuple = PyTuple_New(0);
    if (ls_empty_tuple == NULL)
        return NULL;
    PyObject *bounds = import_bounds();
    if (bounds == NULL)
        return NULL;
    int rc = ls_recorder_init(bounds);
    Py_DECREF(bounds);
    if (rc < 0)
        return NULL;

    if (PyType_Ready(&ls_Reraise_Type) < 0) /* not exported: see asyncio_hooks.c */
        return NULL;
    PyTypeObject *types[] = {&ls_Recorder_Type, &ls_TimedCallback_Type, &ls_TimedIO_Type,
                             &ls_Intercept_Type, &ls_CallSoon_Type, &ls_TimedRun_Type,
                             &ls_Engine_Type, &ls_CreateTask_Type, &ls_TimedPoller_Type,
                             &ls_RunForever_Type, &ls_ClassHook_Type};
    const char *names[] = {"Recorder", "TimedCallback", "TimedIO", "Intercept", "CallSoon",
                           "TimedRun", "Engine", "CreateTask", "TimedPoller", "RunForever",
                           "ClassHook"};
    ls_fast_clock_init();
    if (ls_watch_init() < 0)
        return NULL;
    PyObject *module = PyModule_Create(&speedups_module);
    if (module == NULL)
        return NULL;
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
        if (PyType_Ready(types[i]) < 0 ||
            PyModule_AddObjectRef(module, names[i], (PyObject *)types[i]) < 0) {
            Py_DECREF(module);
            return NULL;
        }
    }
    if (PyModule_AddFunctions(module, ls_clock_methods) < 0 ||
        PyModule_AddIntConstant(module, "NBUCKETS", NBUCKETS) < 0 ||
        PyModule_AddIntConstant(module, "INTERFACE", SPEEDUPS_INTERFACE) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    PyObject *gil_reader = ls_gil_reader_module();
    if (gil_reader == NULL || PyModule_AddObjectRef(module, "gil_reader", gil_reader) < 0) {
        Py_XDECREF(gil_reader);
        Py_DECREF(module);
        return NULL;
    }
    Py_DECREF(gil_reader);
    return module;
}
