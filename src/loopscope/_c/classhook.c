/*
 * ClassHook: what _own_class.py puts on the class made for one loop in place of one of the
 * loop's methods.  That loop finds `value` itself (called as it is, without the loop); the
 * class, and any other object of it, find the method of the loop's own class (`base`).
 *
 * A method descriptor (Py_TPFLAGS_METHOD_DESCRIPTOR), as a function on a class is: a
 * method lookup that is followed by a call (the interpreter's, and from Python 3.12 on
 * that of asyncio's C task, which looks `loop.call_soon` up for every step) does not bind
 * it to the object but calls it with the object first, and for the loop this hands the
 * call to `value` without it.  A plain attribute read binds it with tp_descr_get, which
 * gives the loop `value` itself (no method object is made).
 */
#include "speedups.h"

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *value;
    PyObject *loop;
    PyObject *base; /* the loop's class */
    PyObject *name;
    /* value's vectorcall function where value is one of loopscope's own hooks (which never
     * change it, nor return NULL without an exception), or NULL */
    vectorcallfunc value_call;
} ClassHook;

#define CLASS_HOOK_FIELDS(X) X(value) X(loop) X(base) X(name)
LS_GC_FUNCTIONS(ClassHook, CLASS_HOOK_FIELDS)

/* The loop class's own `name` as obj finds it (the class's when obj is NULL): a new
 * reference, or NULL with AttributeError set. */
static PyObject *base_attribute(ClassHook *self, PyObject *obj, PyObject *type) {
    if (self->base == NULL || self->name == NULL) { /* cleared by the garbage collector */
        PyErr_SetString(PyExc_AttributeError, "a cleared loopscope ClassHook");
        return NULL;
    }
    PyObject *attribute = _PyType_Lookup((PyTypeObject *)self->base, self->name);
    if (attribute == NULL) {
        PyErr_Format(PyExc_AttributeError, "type object '%s' has no attribute '%U'",
                     ((PyTypeObject *)self->base)->tp_name, self->name);
        return NULL;
    }
    descrgetfunc get = Py_TYPE(attribute)->tp_descr_get;
    if (get == NULL)
        return Py_NewRef(attribute);
    Py_INCREF(attribute); /* borrowed from the class, whose dict the call may change */
    PyObject *found = get(attribute, obj, type);
    Py_DECREF(attribute);
    return found;
}

/* A call that is not the loop's own: the method of the loop's class called on args[0], or
 * the TypeError of a descriptor called without the object. */
LS_NOINLINE PyObject *call_other(ClassHook *self, PyObject *const *args, size_t nargsf,
                                 PyObject *kwnames) {
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs >= 1 && args[0] == self->loop) /* a value that is not loopscope's own hook */
        return PyObject_Vectorcall(self->value, args + 1, (size_t)(nargs - 1), kwnames);
    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError, "a loopscope ClassHook needs the object it is called on");
        return NULL;
    }
    PyObject *method = base_attribute(self, args[0], (PyObject *)Py_TYPE(args[0]));
    if (method == NULL)
        return NULL;
    PyObject *result = PyObject_Vectorcall(method, args + 1, (size_t)(nargs - 1), kwnames);
    Py_DECREF(method);
    return result;
}

/* The loop's call of one of loopscope's own hooks goes straight to it (a tail call). */
static PyObject *ClassHook_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf,
                                      PyObject *kwnames) {
    ClassHook *self = (ClassHook *)op;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs >= 1 && args[0] == self->loop && self->value_call != NULL)
        return self->value_call(self->value, args + 1, (size_t)(nargs - 1), kwnames);
    return call_other(self, args, nargsf, kwnames);
}

static PyObject *ClassHook_descr_get(PyObject *op, PyObject *obj, PyObject *type) {
    ClassHook *self = (ClassHook *)op;
    if (obj == Py_None)
        obj = NULL;
    if (obj != NULL && obj == self->loop)
        return Py_NewRef(self->value);
    return base_attribute(self, obj, type);
}

static PyObject *ClassHook_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"value", "loop", "base", "name", NULL};
    PyObject *value, *loop, *base, *name;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO!U:ClassHook", kwlist, &value, &loop,
                                     &PyType_Type, &base, &name))
        return NULL;
    ClassHook *self = (ClassHook *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = ClassHook_vectorcall;
    self->value = Py_NewRef(value);
    self->loop = Py_NewRef(loop);
    self->base = Py_NewRef(base);
    Py_INCREF(name);
    PyUnicode_InternInPlace(&name);
    self->name = name;
    PyTypeObject *kind = Py_TYPE(value);
    if (kind == &ls_Intercept_Type || kind == &ls_CreateTask_Type || kind == &ls_RunForever_Type)
        self->value_call = PyVectorcall_Function(value);
    return (PyObject *)self;
}

static PyObject *ClassHook_repr(ClassHook *self) {
    if (self->value == NULL)
        return PyUnicode_FromString("<loopscope ClassHook (cleared)>");
    return PyUnicode_FromFormat("<loopscope %U of one %s: %R>", self->name,
                                ((PyTypeObject *)self->base)->tp_name, self->value);
}

static PyMemberDef ClassHook_members[] = {
    LS_VECTORCALL_MEMBER(ClassHook),
    {NULL}};

PyTypeObject ls_ClassHook_Type = {
    LS_CALLABLE_TYPE(ClassHook, Py_TPFLAGS_METHOD_DESCRIPTOR),
    .tp_descr_get = ClassHook_descr_get,
    .tp_doc = "ClassHook(value, loop, base, name)\n--\n\n"
              "On the class made for one loop, in place of the method `name` of its class\n"
              "`base`: `loop` finds `value`; the class, and any other object of it, the\n"
              "method of `base`.",
    .tp_dealloc = ls_gc_dealloc,
    .tp_repr = (reprfunc)ClassHook_repr,
    .tp_members = ClassHook_members,
};
