/* Plain YAML data straight from libyaml's events: the values of config/yamlsrc.py's fast
 * path without PyYAML's node objects (a Python object, two marks and a Python __init__ for
 * every node: most of the cold load's YAML time).
 *
 * libyaml is not linked: its functions are taken from the library PyYAML's own C module
 * (yaml._yaml) was built with (``bind``), so that this module and the general loader it
 * stands in for parse with the very same libyaml code.
 *
 * ``load`` returns None (give up: the caller parses with the general loader, which gives
 * the same values or words the error) on anything but plain data: a parse error, an alias,
 * an anchor, an explicit tag, a key that is not a scalar, a duplicate key, a document that
 * is a scalar, nesting reaching max_depth, max_values values or more. A Python exception
 * (a plain scalar the resolver refuses, text that is not UTF-8) is raised as it is.
 *
 * Plain scalars are resolved through ``memo`` (text -> value) and, when not in it, by
 * calling ``plain(text)``, which fills it: the resolution is yamlsrc's, in Python.
 *
 * Each document gives (value, shape, pairs): pairs lists (key, value) for each mapping key
 * in the frozenset ``noted`` met anywhere in it, in the order met; shape describes the nodes of the first three levels
 * (the document's root, its children and theirs), which is what locating a resource and
 * laying out a raw file need:
 *     (kind, index, line, column, flow_style, size, children, text)
 * kind 0 scalar (text: the scalar as written), 1 sequence, 2 mapping; flow_style True,
 * False or None as PyYAML's composer sets it; size the values the node expands to, as
 * yamlsrc counts them (keys included); children None below the second level, else a list
 * of shapes (a sequence) or of (key shape, value shape) pairs (a mapping).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <string.h>
#include <yaml.h>

typedef int (*init_fn)(yaml_parser_t *);
typedef void (*input_fn)(yaml_parser_t *, const unsigned char *, size_t);
typedef int (*parse_fn)(yaml_parser_t *, yaml_event_t *);
typedef void (*event_delete_fn)(yaml_event_t *);
typedef void (*parser_delete_fn)(yaml_parser_t *);

static init_fn p_initialize;
static input_fn p_set_input;
static parse_fn p_parse;
static event_delete_fn p_event_delete;
static parser_delete_fn p_parser_delete;

#define SHALLOW 2 /* levels below the root described in the shape */

typedef struct {
    /* yaml_parser_t, with room to spare should the library's be larger than this header's */
    union {
        yaml_parser_t parser;
        char room[sizeof(yaml_parser_t) + 4096];
    } p;
    yaml_event_t event;
    int has_event;
    unsigned long events;
    int bail;
    PyObject *memo;
    PyObject *plain;
    PyObject *noted; /* a set of keys, or NULL */
    PyObject *pairs; /* (key, value) of each noted key met in the document */
    long counter;
    long max_values;
    long max_depth;
} State;

static int next_event(State *s) {
    if (s->has_event) {
        p_event_delete(&s->event);
        s->has_event = 0;
    }
    /* The GIL is held all along: let a waiting thread (the server's event loop) run now
     * and then, as the interpreter would between bytecodes, so that a big file parsed by
     * a reload does not stall it for the whole file. */
    if ((++s->events & 4095) == 0) {
        Py_BEGIN_ALLOW_THREADS
        Py_END_ALLOW_THREADS
    }
    if (!p_parse(&s->p.parser, &s->event)) {
        s->bail = 1;
        return 0;
    }
    s->has_event = 1;
    return 1;
}

static PyObject *flow(int block, int flow_style, int style) {
    if (style == flow_style) Py_RETURN_TRUE;
    if (style == block) Py_RETURN_FALSE;
    Py_RETURN_NONE;
}

/* The shape of a node (see the top of this file); steals flow_style, children and text
 * (the last two may be NULL). */
static PyObject *shape(int kind, yaml_mark_t mark, PyObject *flow_style, long size,
                       PyObject *children, PyObject *text) {
    if (children == NULL) {
        children = Py_None;
        Py_INCREF(children);
    }
    if (text == NULL) {
        text = Py_None;
        Py_INCREF(text);
    }
    return Py_BuildValue("(innnNlNN)", kind, (Py_ssize_t)mark.index, (Py_ssize_t)mark.line,
                         (Py_ssize_t)mark.column, flow_style, size, children, text);
}

static PyObject *build(State *s, long level, int rel, PyObject **out_shape);

static PyObject *scalar(State *s, int rel, PyObject **out_shape) {
    yaml_event_t *e = &s->event;
    if (e->data.scalar.anchor != NULL || e->data.scalar.tag != NULL || rel == 0) {
        s->bail = 1;
        return NULL;
    }
    PyObject *text = PyUnicode_DecodeUTF8((const char *)e->data.scalar.value,
                                          (Py_ssize_t)e->data.scalar.length, "strict");
    if (text == NULL) return NULL;
    PyObject *value;
    if (e->data.scalar.plain_implicit) {
        value = PyDict_GetItemWithError(s->memo, text);
        if (value != NULL) {
            Py_INCREF(value);
        } else if (PyErr_Occurred()) {
            Py_DECREF(text);
            return NULL;
        } else {
            value = PyObject_CallOneArg(s->plain, text);
            if (value == NULL) {
                Py_DECREF(text);
                return NULL;
            }
        }
    } else {
        value = text;
        Py_INCREF(value);
    }
    if (out_shape != NULL) {
        Py_INCREF(Py_None);
        *out_shape = shape(0, e->start_mark, Py_None, 1, NULL, text); /* steals text */
        if (*out_shape == NULL) {
            Py_DECREF(value);
            return NULL;
        }
    } else {
        Py_DECREF(text);
    }
    return value;
}

static PyObject *sequence(State *s, long level, int rel, PyObject **out_shape) {
    yaml_event_t *e = &s->event;
    if (e->data.sequence_start.anchor != NULL || e->data.sequence_start.tag != NULL ||
        level >= s->max_depth) {
        s->bail = 1;
        return NULL;
    }
    yaml_mark_t mark = e->start_mark;
    PyObject *fs = flow(YAML_BLOCK_SEQUENCE_STYLE, YAML_FLOW_SEQUENCE_STYLE,
                        e->data.sequence_start.style);
    long start = s->counter;
    PyObject *children = NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL) goto fail;
    if (out_shape != NULL && rel < SHALLOW) {
        children = PyList_New(0);
        if (children == NULL) goto fail;
    }
    for (;;) {
        if (!next_event(s)) goto fail;
        if (s->event.type == YAML_SEQUENCE_END_EVENT) break;
        if (++s->counter >= s->max_values) {
            s->bail = 1;
            goto fail;
        }
        PyObject *child_shape = NULL;
        PyObject *item = build(s, level + 1, rel + 1, children != NULL ? &child_shape : NULL);
        if (item == NULL) goto fail;
        int bad = PyList_Append(out, item);
        Py_DECREF(item);
        if (bad) {
            Py_XDECREF(child_shape);
            goto fail;
        }
        if (child_shape != NULL) {
            bad = PyList_Append(children, child_shape);
            Py_DECREF(child_shape);
            if (bad) goto fail;
        }
    }
    if (out_shape != NULL) {
        *out_shape = shape(1, mark, fs, 1 + s->counter - start, children, NULL);
        children = NULL;
        fs = NULL;
        if (*out_shape == NULL) goto fail;
    }
    Py_XDECREF(fs);
    return out;
fail:
    Py_XDECREF(fs);
    Py_XDECREF(children);
    Py_XDECREF(out);
    return NULL;
}

static PyObject *mapping(State *s, long level, int rel, PyObject **out_shape) {
    yaml_event_t *e = &s->event;
    if (e->data.mapping_start.anchor != NULL || e->data.mapping_start.tag != NULL ||
        level >= s->max_depth) {
        s->bail = 1;
        return NULL;
    }
    yaml_mark_t mark = e->start_mark;
    PyObject *fs = flow(YAML_BLOCK_MAPPING_STYLE, YAML_FLOW_MAPPING_STYLE,
                        e->data.mapping_start.style);
    long start = s->counter;
    PyObject *children = NULL;
    PyObject *out = PyDict_New();
    if (out == NULL) goto fail;
    int keep = out_shape != NULL && rel < SHALLOW;
    if (keep) {
        children = PyList_New(0);
        if (children == NULL) goto fail;
    }
    for (;;) {
        if (!next_event(s)) goto fail;
        yaml_event_t *k = &s->event;
        if (k->type == YAML_MAPPING_END_EVENT) break;
        if (k->type != YAML_SCALAR_EVENT || k->data.scalar.anchor != NULL ||
            k->data.scalar.tag != NULL) {
            s->bail = 1; /* a key that is not a plain-data scalar */
            goto fail;
        }
        s->counter += 2;
        if (s->counter >= s->max_values) {
            s->bail = 1;
            goto fail;
        }
        /* Keys are names: kept as written (yamlsrc: ``on:`` is the key "on"). */
        PyObject *key = PyUnicode_DecodeUTF8((const char *)k->data.scalar.value,
                                             (Py_ssize_t)k->data.scalar.length, "strict");
        if (key == NULL) goto fail;
        PyObject *key_shape = NULL;
        if (keep) {
            Py_INCREF(key);
            Py_INCREF(Py_None);
            key_shape = shape(0, k->start_mark, Py_None, 1, NULL, key);
            if (key_shape == NULL) {
                Py_DECREF(key);
                goto fail;
            }
        }
        if (!next_event(s)) {
            Py_DECREF(key);
            Py_XDECREF(key_shape);
            goto fail;
        }
        PyObject *value_shape = NULL;
        PyObject *value = build(s, level + 1, rel + 1, keep ? &value_shape : NULL);
        if (value == NULL) {
            Py_DECREF(key);
            Py_XDECREF(key_shape);
            goto fail;
        }
        int found = PyDict_Contains(out, key);
        int bad = found != 0 || PyDict_SetItem(out, key, value) != 0;
        if (found == 1) s->bail = 1; /* a duplicate key: the general loader words it */
        if (!bad && s->noted != NULL) {
            int noted = PySet_Contains(s->noted, key);
            if (noted < 0) {
                bad = 1;
            } else if (noted) {
                PyObject *pair = PyTuple_Pack(2, key, value);
                bad = pair == NULL || PyList_Append(s->pairs, pair) != 0;
                Py_XDECREF(pair);
            }
        }
        Py_DECREF(key);
        Py_DECREF(value);
        if (bad) {
            Py_XDECREF(key_shape);
            Py_XDECREF(value_shape);
            goto fail;
        }
        if (keep) {
            PyObject *pair = PyTuple_Pack(2, key_shape, value_shape);
            Py_DECREF(key_shape);
            Py_DECREF(value_shape);
            if (pair == NULL) goto fail;
            bad = PyList_Append(children, pair);
            Py_DECREF(pair);
            if (bad) goto fail;
        }
    }
    if (out_shape != NULL) {
        *out_shape = shape(2, mark, fs, 1 + s->counter - start, children, NULL);
        children = NULL;
        fs = NULL;
        if (*out_shape == NULL) goto fail;
    }
    Py_XDECREF(fs);
    return out;
fail:
    Py_XDECREF(fs);
    Py_XDECREF(children);
    Py_XDECREF(out);
    return NULL;
}

/* The value of the node whose first event is the current one; NULL with s->bail set to
 * give up, or with a Python exception set. */
static PyObject *build(State *s, long level, int rel, PyObject **out_shape) {
    if (out_shape != NULL && rel > SHALLOW) out_shape = NULL;
    switch (s->event.type) {
    case YAML_SCALAR_EVENT:
        return scalar(s, rel, out_shape);
    case YAML_SEQUENCE_START_EVENT:
        return sequence(s, level, rel, out_shape);
    case YAML_MAPPING_START_EVENT:
        return mapping(s, level, rel, out_shape);
    default: /* an alias */
        s->bail = 1;
        return NULL;
    }
}

static PyObject *load(PyObject *self, PyObject *args) {
    Py_buffer data;
    PyObject *memo, *plain, *noted;
    long depth, max_depth, max_values;
    if (p_parse == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bind() first");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "y*O!OlllO!", &data, &PyDict_Type, &memo, &plain, &depth,
                          &max_depth, &max_values, &PyFrozenSet_Type, &noted))
        return NULL;
    State *s = PyMem_Calloc(1, sizeof(State));
    if (s == NULL) {
        PyBuffer_Release(&data);
        return PyErr_NoMemory();
    }
    s->memo = memo;
    s->plain = plain;
    s->noted = PySet_GET_SIZE(noted) ? noted : NULL;
    s->max_depth = max_depth;
    s->max_values = max_values;
    PyObject *docs = NULL;
    if (!p_initialize(&s->p.parser)) {
        PyMem_Free(s);
        PyBuffer_Release(&data);
        return PyErr_NoMemory();
    }
    p_set_input(&s->p.parser, (const unsigned char *)data.buf, (size_t)data.len);
    docs = PyList_New(0);
    if (docs == NULL) goto done;
    if (!next_event(s) || s->event.type != YAML_STREAM_START_EVENT) goto done;
    for (;;) {
        if (!next_event(s)) goto done;
        if (s->event.type == YAML_STREAM_END_EVENT) break;
        if (s->event.type != YAML_DOCUMENT_START_EVENT || !next_event(s)) {
            s->bail = 1;
            goto done;
        }
        s->counter = 0;
        Py_CLEAR(s->pairs);
        s->pairs = PyList_New(0);
        if (s->pairs == NULL) goto done;
        PyObject *top = NULL;
        PyObject *value = build(s, depth, 0, &top);
        if (value == NULL) goto done;
        PyObject *pair = PyTuple_Pack(3, value, top, s->pairs);
        Py_DECREF(value);
        Py_DECREF(top);
        if (pair == NULL) goto done;
        int bad = PyList_Append(docs, pair);
        Py_DECREF(pair);
        if (bad) goto done;
        if (!next_event(s)) goto done;
        if (s->event.type != YAML_DOCUMENT_END_EVENT) {
            s->bail = 1;
            goto done;
        }
    }
done:
    if (s->has_event) p_event_delete(&s->event);
    p_parser_delete(&s->p.parser);
    Py_CLEAR(s->pairs);
    if (PyErr_Occurred()) {
        Py_CLEAR(docs);
    } else if (s->bail) {
        Py_XDECREF(docs);
        docs = Py_None;
        Py_INCREF(docs);
    }
    PyMem_Free(s);
    PyBuffer_Release(&data);
    return docs;
}

static PyObject *bind(PyObject *self, PyObject *arg) {
    PyObject *bytes = NULL;
    if (!PyUnicode_FSConverter(arg, &bytes)) return NULL;
    /* The library is already loaded (yaml._yaml imported): find it, do not load it. */
    void *handle = dlopen(PyBytes_AS_STRING(bytes), RTLD_LAZY | RTLD_NOLOAD);
    Py_DECREF(bytes);
    if (handle == NULL) {
        PyErr_SetString(PyExc_ImportError, "yaml._yaml is not loaded");
        return NULL;
    }
    init_fn a = (init_fn)dlsym(handle, "yaml_parser_initialize");
    input_fn b = (input_fn)dlsym(handle, "yaml_parser_set_input_string");
    parse_fn c = (parse_fn)dlsym(handle, "yaml_parser_parse");
    event_delete_fn d = (event_delete_fn)dlsym(handle, "yaml_event_delete");
    parser_delete_fn f = (parser_delete_fn)dlsym(handle, "yaml_parser_delete");
    const char *(*version)(void) = (const char *(*)(void))dlsym(handle, "yaml_get_version_string");
    if (!a || !b || !c || !d || !f || !version) {
        PyErr_SetString(PyExc_ImportError, "yaml._yaml does not export libyaml's functions");
        return NULL;
    }
    p_initialize = a;
    p_set_input = b;
    p_event_delete = d;
    p_parser_delete = f;
    p_parse = c;
    return PyUnicode_FromString(version());
}

static PyMethodDef methods[] = {
    {"load", load, METH_VARARGS,
     "load(data, memo, plain, depth, max_depth, max_values, noted) -> [(value, shape, pairs)] or None"},
    {"bind", bind, METH_O, "bind(path of yaml._yaml) -> libyaml's version"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_yamlc", NULL, -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__yamlc(void) { return PyModule_Create(&module); }
