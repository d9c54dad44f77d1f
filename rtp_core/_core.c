/* rtp_core._core: CPython bindings of the media engine (Engine), the offline Recorder used by the
 * tests and the small codec/parser entry points that the tests compare with the Python reference. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "rtp_core.h"

/* ---- helpers ------------------------------------------------------------------------------- */

static PyObject *leg_dict(const rc_leg_t *L, const rc_leg_stats_t *io)
{
    const char *codec = rc_codec_name(L->codec);
    PyObject *d = Py_BuildValue(
        "{s:N,s:K,s:K,s:K,s:K,s:K,s:K,s:d,s:d,s:d,s:K,s:z,s:s#,s:K,s:K}",
        "ssrc", L->stream ? PyLong_FromUnsignedLong(L->ssrc) : Py_NewRef(Py_None),
        "packets", (unsigned long long)L->packets,
        "bytes", (unsigned long long)L->bytes,
        "lost", (unsigned long long)rc_leg_lost(L),
        "late", (unsigned long long)L->late,
        "duplicates", (unsigned long long)L->duplicates,
        "reordered", (unsigned long long)L->reordered,
        "jitter_ms", L->jitter / 8.0,
        "gap_total_ms", (double)L->gap_total / 8.0,
        "longest_gap_ms", (double)L->gap_longest / 8.0,
        "invalid", (unsigned long long)L->invalid,
        "codec", codec,
        "dtmf", L->dtmf, (Py_ssize_t)L->dtmf_len,
        "undecoded", (unsigned long long)L->undecoded,
        "reanchors", (unsigned long long)L->reanchors);
    if (d && io) {
        PyObject *v;
        int bad = 0;
        v = io->added ? PyLong_FromLong(io->port) : Py_NewRef(Py_None);
        bad |= !v || PyDict_SetItemString(d, "port", v) < 0;
        Py_XDECREF(v);
        v = io->has_remote ? Py_BuildValue("(si)", io->remote_ip, io->remote_port) : Py_NewRef(Py_None);
        bad |= !v || PyDict_SetItemString(d, "remote", v) < 0;
        Py_XDECREF(v);
#define SETU(name, x)                                                         \
    v = PyLong_FromUnsignedLongLong((unsigned long long)(x));                 \
    bad |= !v || PyDict_SetItemString(d, name, v) < 0;                        \
    Py_XDECREF(v);
        SETU("relayed", io->relayed);
        SETU("rtcp_packets", io->rtcp_packets);
        SETU("rtcp_relayed", io->rtcp_relayed);
        SETU("send_errors", io->send_errors);
        SETU("foreign", io->foreign);
        SETU("relatches", io->relatches);
#undef SETU
        if (bad) {
            Py_DECREF(d);
            return NULL;
        }
    }
    return d;
}

static PyObject *event_tuple(const rc_event_t *ev)
{
    switch (ev->kind) {
    case RC_EV_STARTED:
        return Py_BuildValue("(sLi(sik))", "started", (long long)ev->session, ev->leg, ev->ip, ev->port,
                             (unsigned long)ev->ssrc);
    case RC_EV_SSRC_CHANGE:
        return Py_BuildValue("(sLik)", "ssrc_change", (long long)ev->session, ev->leg, (unsigned long)ev->ssrc);
    case RC_EV_DTMF:
        return Py_BuildValue("(sLi(s#i))", "dtmf", (long long)ev->session, ev->leg, &ev->digit, (Py_ssize_t)1,
                             ev->duration_ms);
    case RC_EV_TIMEOUT:
        return Py_BuildValue("(sLiO)", "timeout", (long long)ev->session, ev->leg, Py_None);
    default:
        return Py_BuildValue("(sLiO)", "unknown", (long long)ev->session, ev->leg, Py_None);
    }
}

static PyObject *events_list(const rc_event_t *evs, size_t n)
{
    PyObject *list = PyList_New((Py_ssize_t)n);
    if (!list)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        PyObject *t = event_tuple(&evs[i]);
        if (!t) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, t);
    }
    return list;
}

/* mapping {pt: name} -> ptmap (defaults for 0, 8, 13, 101 kept unless overridden) */
static int fill_ptmap(PyObject *mapping, uint8_t ptmap[128])
{
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    if (!PyDict_Check(mapping)) {
        PyErr_SetString(PyExc_TypeError, "payload types must be a dict {int: str}");
        return -1;
    }
    memset(ptmap, RC_PT_UNKNOWN, 128);
    ptmap[0] = RC_PT_PCMU;
    ptmap[8] = RC_PT_PCMA;
    ptmap[13] = RC_PT_CN;
    ptmap[101] = RC_PT_TE;
    while (PyDict_Next(mapping, &pos, &key, &value)) {
        long pt = PyLong_AsLong(key);
        const char *name;
        if (pt == -1 && PyErr_Occurred())
            return -1;
        if (pt < 0 || pt > 127) {
            PyErr_Format(PyExc_ValueError, "payload type %ld is outside 0-127", pt);
            return -1;
        }
        name = PyUnicode_Check(value) ? PyUnicode_AsUTF8(value) : NULL;
        if (!name) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_TypeError, "the codec name of payload type %ld must be a str", pt);
            return -1;
        }
        ptmap[pt] = (uint8_t)rc_codec_kind(name);
    }
    return 0;
}

/* ---- codec / parser entry points ----------------------------------------------------------- */

static PyObject *g711_decode(PyObject *arg, const int16_t *table)
{
    Py_buffer b;
    PyObject *out;
    int16_t *dst;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    out = PyBytes_FromStringAndSize(NULL, b.len * 2);
    if (out) {
        dst = (int16_t *)PyBytes_AS_STRING(out);
        for (Py_ssize_t i = 0; i < b.len; i++)
            dst[i] = table[((const uint8_t *)b.buf)[i]];
    }
    PyBuffer_Release(&b);
    return out;
}

static PyObject *py_ulaw_decode(PyObject *self, PyObject *arg) { return g711_decode(arg, rc_ulaw_table); }
static PyObject *py_alaw_decode(PyObject *self, PyObject *arg) { return g711_decode(arg, rc_alaw_table); }

static PyObject *py_parse_rtp(PyObject *self, PyObject *arg)
{
    Py_buffer b;
    rc_rtp_t p;
    PyObject *r;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    if (rc_parse_rtp(b.buf, (size_t)b.len, &p) < 0) {
        PyBuffer_Release(&b);
        Py_RETURN_NONE;
    }
    r = Py_BuildValue("(iiIkky#)", p.marker, p.pt, (unsigned)p.seq, (unsigned long)p.ts, (unsigned long)p.ssrc,
                      (const char *)p.payload, (Py_ssize_t)p.payload_len);
    PyBuffer_Release(&b);
    return r;
}

static PyObject *py_parse_ipv4_udp(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"packet", "csum_known", NULL};
    Py_buffer b;
    int csum_known = 0, r;
    const uint8_t *udp;
    size_t ulen;
    PyObject *out;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "y*|$p", kwlist, &b, &csum_known))
        return NULL;
    r = rc_pkt_parse_ipv4(b.buf, (size_t)b.len, csum_known, &udp, &ulen);
    if (r > 0)
        out = Py_BuildValue("(nn)", (Py_ssize_t)(udp - (const uint8_t *)b.buf), (Py_ssize_t)ulen);
    else
        out = PyUnicode_FromString(r < 0 ? "udp checksum" : "invalid");
    PyBuffer_Release(&b);
    return out;
}

/* ---- Recorder (offline, deterministic) ----------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    rc_rec_t rec;
    int init;
    char *out;
    size_t outlen, outcap;
    int oom;
    rc_event_t *evs;
    size_t nev, evcap;
} RecorderObject;

static void rec_sink(void *ctx, const int16_t *pcm, size_t frames, int channels)
{
    RecorderObject *o = ctx;
    size_t n = frames * (size_t)channels * 2;
    if (o->outlen + n > o->outcap) {
        size_t cap = o->outcap ? o->outcap : 4096;
        char *p;
        while (cap < o->outlen + n)
            cap *= 2;
        p = realloc(o->out, cap);
        if (!p) {
            o->oom = 1;
            return;
        }
        o->out = p;
        o->outcap = cap;
    }
    memcpy(o->out + o->outlen, pcm, n);
    o->outlen += n;
}

static void rec_event(void *ctx, const rc_event_t *ev)
{
    RecorderObject *o = ctx;
    if (o->nev == o->evcap) {
        size_t cap = o->evcap ? o->evcap * 2 : 16;
        rc_event_t *p = realloc(o->evs, cap * sizeof *p);
        if (!p) {
            o->oom = 1;
            return;
        }
        o->evs = p;
        o->evcap = cap;
    }
    o->evs[o->nev++] = *ev;
}

static int Recorder_init(RecorderObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"channels", "reorder_ms", "audio", NULL};
    int channels = 2, reorder_ms = 100, audio = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|$iip", kwlist, &channels, &reorder_ms, &audio))
        return -1;
    if (channels != 1 && channels != 2) {
        PyErr_SetString(PyExc_ValueError, "channels must be 1 or 2");
        return -1;
    }
    if (reorder_ms < 0 || reorder_ms > RC_MAX_REORDER_MS) {
        PyErr_Format(PyExc_ValueError, "reorder_ms must be within 0-%d", RC_MAX_REORDER_MS);
        return -1;
    }
    if (self->init)
        rc_rec_free(&self->rec);
    self->init = 0;
    if (rc_rec_init(&self->rec, channels, reorder_ms, audio) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    self->init = 1;
    self->rec.sink = rec_sink;
    self->rec.on_event = rec_event;
    self->rec.ctx = self;
    return 0;
}

static void Recorder_dealloc(RecorderObject *self)
{
    if (self->init)
        rc_rec_free(&self->rec);
    free(self->out);
    free(self->evs);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int rec_ready(RecorderObject *self)
{
    if (!self->init) {
        PyErr_SetString(PyExc_ValueError, "Recorder not initialised");
        return 0;
    }
    return 1;
}

static PyObject *take_output(RecorderObject *self)
{
    PyObject *b;
    if (self->oom) {
        self->oom = 0;
        return PyErr_NoMemory();
    }
    b = PyBytes_FromStringAndSize(self->out ? self->out : "", (Py_ssize_t)self->outlen);
    self->outlen = 0;
    return b;
}

static PyObject *Recorder_feed(RecorderObject *self, PyObject *args)
{
    int leg;
    long long now;
    Py_buffer b;
    rc_rtp_t p;
    int ok;
    if (!rec_ready(self) || !PyArg_ParseTuple(args, "iLy*", &leg, &now, &b))
        return NULL;
    if (leg != 0 && leg != 1) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "leg must be 0 or 1");
        return NULL;
    }
    ok = rc_parse_rtp(b.buf, (size_t)b.len, &p) == 0;
    if (ok)
        rc_rec_packet(&self->rec, leg, now, &p, "0.0.0.0", 0);
    else
        self->rec.leg[leg].invalid++;
    PyBuffer_Release(&b);
    return PyBool_FromLong(ok);
}

static PyObject *Recorder_tick(RecorderObject *self, PyObject *arg)
{
    long long now = PyLong_AsLongLong(arg);
    if (!rec_ready(self) || (now == -1 && PyErr_Occurred()))
        return NULL;
    rc_rec_tick(&self->rec, now);
    return take_output(self);
}

static PyObject *Recorder_flush(RecorderObject *self, PyObject *arg)
{
    long long now = PyLong_AsLongLong(arg);
    if (!rec_ready(self) || (now == -1 && PyErr_Occurred()))
        return NULL;
    rc_rec_flush(&self->rec, now);
    return take_output(self);
}

static PyObject *Recorder_set_recording(RecorderObject *self, PyObject *args)
{
    int enabled;
    long long now;
    if (!rec_ready(self) || !PyArg_ParseTuple(args, "pL", &enabled, &now))
        return NULL;
    rc_rec_set_recording(&self->rec, enabled, now);
    Py_RETURN_NONE;
}

static PyObject *Recorder_set_payload_types(RecorderObject *self, PyObject *args)
{
    int leg;
    PyObject *mapping;
    if (!rec_ready(self) || !PyArg_ParseTuple(args, "iO", &leg, &mapping))
        return NULL;
    if (leg != 0 && leg != 1) {
        PyErr_SetString(PyExc_ValueError, "leg must be 0 or 1");
        return NULL;
    }
    if (fill_ptmap(mapping, self->rec.leg[leg].ptmap) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Recorder_events(RecorderObject *self, PyObject *unused)
{
    PyObject *l = events_list(self->evs, self->nev);
    if (l)
        self->nev = 0;
    return l;
}

static PyObject *Recorder_stats(RecorderObject *self, PyObject *unused)
{
    PyObject *a, *b, *d;
    if (!rec_ready(self))
        return NULL;
    a = leg_dict(&self->rec.leg[0], NULL);
    b = a ? leg_dict(&self->rec.leg[1], NULL) : NULL;
    if (!b) {
        Py_XDECREF(a);
        return NULL;
    }
    d = Py_BuildValue("{s:d,s:L,s:i,s:[NN]}", "duration", (double)self->rec.emitted / RC_RATE, "samples",
                      (long long)self->rec.emitted, "channels", self->rec.channels, "legs", a, b);
    return d;
}

static PyMethodDef Recorder_methods[] = {
    {"feed", (PyCFunction)Recorder_feed, METH_VARARGS,
     "feed(leg, now_ns, datagram) -> bool: one datagram arriving at now_ns (False: invalid, counted)"},
    {"tick", (PyCFunction)Recorder_tick, METH_O, "tick(now_ns) -> bytes: emit samples older than the window"},
    {"flush", (PyCFunction)Recorder_flush, METH_O, "flush(now_ns) -> bytes: emit everything (end of session)"},
    {"set_recording", (PyCFunction)Recorder_set_recording, METH_VARARGS, "set_recording(enabled, now_ns)"},
    {"set_payload_types", (PyCFunction)Recorder_set_payload_types, METH_VARARGS,
     "set_payload_types(leg, {pt: name})"},
    {"events", (PyCFunction)Recorder_events, METH_NOARGS, "drain the events"},
    {"stats", (PyCFunction)Recorder_stats, METH_NOARGS, "the statistics, as close_session reports them"},
    {NULL, NULL, 0, NULL}};

static PyTypeObject RecorderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "rtp_core._core.Recorder",
    .tp_basicsize = sizeof(RecorderObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Recorder(*, channels=2, reorder_ms=100, audio=True): the engine's recording path without "
              "sockets or clock, fed datagrams with arrival times (for tests and tools).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Recorder_init,
    .tp_dealloc = (destructor)Recorder_dealloc,
    .tp_methods = Recorder_methods,
};

/* ---- Engine -------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    rc_engine_t *eng;
    int closed;
    int64_t next_id;
} EngineObject;

static int Engine_init(EngineObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"bind_ip", "port_min", "port_max", "threads", "io", NULL};
    const char *bind_ip = "127.0.0.1", *io = "auto";
    int port_min = 20000, port_max = 29999, threads = 1, err_no = 0, io_mode;
    char err[200];
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|$siiis", kwlist, &bind_ip, &port_min, &port_max, &threads, &io))
        return -1;
    if (strcmp(io, "auto") == 0)
        io_mode = RC_IO_AUTO;
    else if (strcmp(io, "epoll") == 0)
        io_mode = RC_IO_EPOLL;
    else if (strcmp(io, "io_uring") == 0)
        io_mode = RC_IO_URING;
    else if (strcmp(io, "packet") == 0)
        io_mode = RC_IO_PACKET;
    else {
        PyErr_Format(PyExc_ValueError, "io must be 'auto', 'packet', 'io_uring' or 'epoll', not %.40s", io);
        return -1;
    }
    if (self->eng) {
        PyErr_SetString(PyExc_ValueError, "Engine already initialised");
        return -1;
    }
    if (port_min < 1 || port_max > 65535 || port_max - (port_min + (port_min & 1)) < 1) {
        PyErr_Format(PyExc_ValueError, "port range %d-%d holds no even/odd port pair", port_min, port_max);
        return -1;
    }
    if (threads < 1 || threads > 64) {
        PyErr_SetString(PyExc_ValueError, "threads must be within 1-64");
        return -1;
    }
    Py_BEGIN_ALLOW_THREADS
    self->eng = rc_engine_new(bind_ip, port_min, port_max, threads, io_mode, err, sizeof err, &err_no);
    Py_END_ALLOW_THREADS
    if (!self->eng) {
        if (err_no)
            PyErr_Format(PyExc_OSError, "%s", err);
        else
            PyErr_SetString(PyExc_ValueError, err);
        return -1;
    }
    self->next_id = 1;
    return 0;
}

static void Engine_dealloc(EngineObject *self)
{
    if (self->eng) {
        Py_BEGIN_ALLOW_THREADS
        rc_engine_free(self->eng);
        Py_END_ALLOW_THREADS
        self->eng = NULL;
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int eng_ready(EngineObject *self)
{
    if (!self->eng || self->closed) {
        PyErr_SetString(PyExc_ValueError, "the engine is closed");
        return 0;
    }
    return 1;
}

static int call(EngineObject *self, rc_cmd_t *c)
{
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = rc_engine_call(self->eng, c);
    Py_END_ALLOW_THREADS
    if (err == RC_EVALUE) {
        PyErr_SetString(PyExc_ValueError, c->msg[0] ? c->msg : "invalid argument");
        return -1;
    }
    if (err > 0) {
        PyObject *e = Py_BuildValue("(is)", err, c->msg[0] ? c->msg : strerror(err));
        if (e) {
            PyErr_SetObject(PyExc_OSError, e);
            Py_DECREF(e);
        }
        return -1;
    }
    return 0;
}

static int check_leg(int leg)
{
    if (leg != 0 && leg != 1) {
        PyErr_Format(PyExc_ValueError, "leg must be 0 (caller) or 1 (callee), not %d", leg);
        return -1;
    }
    return 0;
}

static PyObject *Engine_fileno(EngineObject *self, PyObject *unused)
{
    if (!eng_ready(self))
        return NULL;
    return PyLong_FromLong(rc_engine_event_fd(self->eng));
}

static PyObject *Engine_poll_events(EngineObject *self, PyObject *unused)
{
    rc_event_t *evs;
    size_t n;
    PyObject *l;
    if (!self->eng)
        return PyList_New(0);
    n = rc_engine_take_events(self->eng, &evs);
    l = events_list(evs, n);
    free(evs);
    return l;
}

static PyObject *Engine_open_session(EngineObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"output_path", "channels", "mode", "reorder_ms", "timeout_s", "strict_source", NULL};
    PyObject *path = Py_None, *pathb = NULL;
    int channels = 2, reorder_ms = 100, strict = 1;
    const char *mode = "bridge";
    double timeout_s = 60.0;
    rc_cmd_t c;
    if (!eng_ready(self) ||
        !PyArg_ParseTupleAndKeywords(args, kw, "|$Oisidp", kwlist, &path, &channels, &mode, &reorder_ms, &timeout_s,
                                     &strict))
        return NULL;
    memset(&c, 0, sizeof c);
    if (channels != 1 && channels != 2)
        return PyErr_Format(PyExc_ValueError, "channels must be 1 or 2, not %d", channels);
    if (strcmp(mode, "bridge") == 0)
        c.mode = RC_MODE_BRIDGE;
    else if (strcmp(mode, "record") == 0)
        c.mode = RC_MODE_RECORD;
    else
        return PyErr_Format(PyExc_ValueError, "mode must be 'bridge' or 'record', not %R",
                            PyTuple_GET_SIZE(args) ? Py_None : PyDict_GetItemString(kw, "mode"));
    if (reorder_ms < 0 || reorder_ms > RC_MAX_REORDER_MS)
        return PyErr_Format(PyExc_ValueError, "reorder_ms must be within 0-%d", RC_MAX_REORDER_MS);
    if (!(timeout_s >= 0) || timeout_s > 1e7)
        return PyErr_Format(PyExc_ValueError, "timeout_s must be >= 0 (0: never)");
    if (path != Py_None) {
        if (!PyUnicode_FSConverter(path, &pathb))
            return NULL;
        c.path = PyBytes_AS_STRING(pathb);
    }
    c.op = RC_CMD_OPEN;
    c.session = self->next_id++;
    c.channels = channels;
    c.reorder_ms = reorder_ms;
    c.timeout_s = timeout_s;
    c.strict = strict;
    if (call(self, &c) < 0) {
        Py_XDECREF(pathb);
        return NULL;
    }
    Py_XDECREF(pathb);
    return PyLong_FromLongLong(c.session);
}

static PyObject *Engine_add_leg(EngineObject *self, PyObject *args)
{
    rc_cmd_t c;
    long long session;
    int leg;
    if (!eng_ready(self) || !PyArg_ParseTuple(args, "Li", &session, &leg) || check_leg(leg) < 0)
        return NULL;
    memset(&c, 0, sizeof c);
    c.op = RC_CMD_ADD_LEG;
    c.session = session;
    c.leg = leg;
    if (session < 1)
        return PyErr_Format(PyExc_ValueError, "unknown session %lld", session);
    if (call(self, &c) < 0)
        return NULL;
    return PyLong_FromLong(c.result_port);
}

static PyObject *Engine_set_remote(EngineObject *self, PyObject *args)
{
    rc_cmd_t c;
    long long session;
    int leg, port;
    const char *ip;
    struct in_addr a;
    if (!eng_ready(self) || !PyArg_ParseTuple(args, "Lisi", &session, &leg, &ip, &port) || check_leg(leg) < 0)
        return NULL;
    if (inet_pton(AF_INET, ip, &a) != 1)
        return PyErr_Format(PyExc_ValueError, "remote address must be IPv4, not %s", ip);
    if (port < 0 || port > 65534)
        return PyErr_Format(PyExc_ValueError, "remote port %d is out of range", port);
    if (session < 1)
        return PyErr_Format(PyExc_ValueError, "unknown session %lld", session);
    memset(&c, 0, sizeof c);
    c.op = RC_CMD_SET_REMOTE;
    c.session = session;
    c.leg = leg;
    c.ip = a.s_addr;
    /* RFC 3264 section 8.4 placeholder port 9 (discard) with 0.0.0.0 */
    c.port = (a.s_addr == 0) ? 0 : port;
    if (call(self, &c) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Engine_set_payload_types(EngineObject *self, PyObject *args)
{
    rc_cmd_t c;
    long long session;
    int leg;
    PyObject *mapping;
    if (!eng_ready(self) || !PyArg_ParseTuple(args, "LiO", &session, &leg, &mapping) || check_leg(leg) < 0)
        return NULL;
    memset(&c, 0, sizeof c);
    if (fill_ptmap(mapping, c.ptmap) < 0)
        return NULL;
    if (session < 1)
        return PyErr_Format(PyExc_ValueError, "unknown session %lld", session);
    c.op = RC_CMD_SET_PTS;
    c.session = session;
    c.leg = leg;
    if (call(self, &c) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Engine_set_recording(EngineObject *self, PyObject *args)
{
    rc_cmd_t c;
    long long session;
    int enabled;
    if (!eng_ready(self) || !PyArg_ParseTuple(args, "Lp", &session, &enabled))
        return NULL;
    if (session < 1)
        return PyErr_Format(PyExc_ValueError, "unknown session %lld", session);
    memset(&c, 0, sizeof c);
    c.op = RC_CMD_SET_RECORDING;
    c.session = session;
    c.enabled = enabled;
    if (call(self, &c) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *stats_dict(const rc_stats_t *st)
{
    PyObject *a = leg_dict(&st->legs[0].rec, &st->legs[0]), *b, *start, *werr;
    b = a ? leg_dict(&st->legs[1].rec, &st->legs[1]) : NULL;
    if (!b) {
        Py_XDECREF(a);
        return NULL;
    }
    start = st->start >= 0 ? PyFloat_FromDouble(st->start) : Py_NewRef(Py_None);
    werr = st->write_errno ? PyLong_FromLong(st->write_errno) : Py_NewRef(Py_None);
    return Py_BuildValue("{s:d,s:L,s:i,s:N,s:s,s:O,s:K,s:N,s:[NN]}", "duration", (double)st->samples / RC_RATE,
                         "samples", (long long)st->samples, "channels", st->channels, "start", start, "mode",
                         st->mode == RC_MODE_BRIDGE ? "bridge" : "record", "recording",
                         st->recording ? Py_True : Py_False, "wav_bytes", (unsigned long long)st->wav_bytes,
                         "write_errno", werr, "legs", a, b);
}

static PyObject *session_stats_op(EngineObject *self, PyObject *arg, int op)
{
    rc_cmd_t c;
    rc_stats_t *st;
    PyObject *r;
    long long session = PyLong_AsLongLong(arg);
    if (!eng_ready(self) || (session == -1 && PyErr_Occurred()))
        return NULL;
    if (session < 1)
        return PyErr_Format(PyExc_ValueError, "unknown session %lld", session);
    st = malloc(sizeof *st);
    if (!st)
        return PyErr_NoMemory();
    memset(&c, 0, sizeof c);
    c.op = op;
    c.session = session;
    c.stats = st;
    if (call(self, &c) < 0) {
        free(st);
        return NULL;
    }
    r = stats_dict(st);
    free(st);
    return r;
}

static PyObject *Engine_session_stats(EngineObject *self, PyObject *arg)
{
    return session_stats_op(self, arg, RC_CMD_STATS);
}

static PyObject *Engine_close_session(EngineObject *self, PyObject *arg)
{
    return session_stats_op(self, arg, RC_CMD_CLOSE);
}

static PyObject *Engine_close(EngineObject *self, PyObject *unused)
{
    if (self->eng && !self->closed) {
        self->closed = 1;
        Py_BEGIN_ALLOW_THREADS
        rc_engine_stop(self->eng);
        Py_END_ALLOW_THREADS
    }
    Py_RETURN_NONE;
}

static PyObject *Engine_loop_stats(EngineObject *self, PyObject *unused)
{
    PyObject *list;
    if (!self->eng)
        return PyList_New(0);
    list = PyList_New(rc_engine_nthreads(self->eng));
    for (int i = 0; list && i < rc_engine_nthreads(self->eng); i++) {
        rc_loop_stats_t ls;
        PyObject *d;
        rc_engine_loop_stats(self->eng, i, &ls);
        d = Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:d,s:d,s:d,s:d,s:d,s:K}", "iterations",
                          (unsigned long long)ls.iterations, "datagrams", (unsigned long long)ls.datagrams,
                          "ring_drops", (unsigned long long)ls.ring_drops, "ring_rejected",
                          (unsigned long long)ls.ring_rejected,
                          "socket_events", (unsigned long long)ls.events, "ticks", (unsigned long long)ls.ticks,
                          "tick_ms_avg", ls.ticks ? ls.tick_ns / 1e6 / (double)ls.ticks : 0.0, "tick_ms_max",
                          ls.max_tick_ns / 1e6, "tick_cpu_ms_max", ls.max_tick_cpu_ns / 1e6, "tick_late_ms_max", ls.max_tick_late_ns / 1e6, "io_ms_max",
                          ls.max_io_ns / 1e6, "events_dropped", (unsigned long long)ls.events_dropped);
        if (!d) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, d);
    }
    return list;
}

static PyObject *Engine_enter(EngineObject *self, PyObject *unused)
{
    return Py_NewRef(self);
}

static PyObject *Engine_exit(EngineObject *self, PyObject *args)
{
    PyObject *r = Engine_close(self, NULL);
    Py_XDECREF(r);
    Py_RETURN_FALSE;
}

static PyObject *Engine_get_threads(EngineObject *self, void *unused)
{
    return PyLong_FromLong(self->eng ? rc_engine_nthreads(self->eng) : 0);
}

static PyObject *Engine_get_closed(EngineObject *self, void *unused)
{
    return PyBool_FromLong(!self->eng || self->closed);
}

static PyObject *Engine_get_io(EngineObject *self, void *unused)
{
    return PyUnicode_FromString(self->eng ? rc_engine_io_name(self->eng) : "closed");
}

static PyGetSetDef Engine_getset[] = {
    {"io", (getter)Engine_get_io, NULL, "the receive path in use: 'packet', 'io_uring' or 'epoll'", NULL},
    {"threads", (getter)Engine_get_threads, NULL, "number of engine threads", NULL},
    {"closed", (getter)Engine_get_closed, NULL, "True after close()", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PyMethodDef Engine_methods[] = {
    {"fileno", (PyCFunction)Engine_fileno, METH_NOARGS, "fd readable while events are pending"},
    {"poll_events", (PyCFunction)Engine_poll_events, METH_NOARGS, "drain the pending events"},
    {"open_session", (PyCFunction)(void (*)(void))Engine_open_session, METH_VARARGS | METH_KEYWORDS,
     "open_session(*, output_path, channels=2, mode='bridge', reorder_ms=100, timeout_s=60.0) -> id"},
    {"add_leg", (PyCFunction)Engine_add_leg, METH_VARARGS, "add_leg(session, leg) -> RTP port"},
    {"set_remote", (PyCFunction)Engine_set_remote, METH_VARARGS, "set_remote(session, leg, ip, port)"},
    {"set_payload_types", (PyCFunction)Engine_set_payload_types, METH_VARARGS,
     "set_payload_types(session, leg, {pt: name})"},
    {"set_recording", (PyCFunction)Engine_set_recording, METH_VARARGS, "set_recording(session, enabled)"},
    {"session_stats", (PyCFunction)Engine_session_stats, METH_O, "session_stats(session) -> dict"},
    {"close_session", (PyCFunction)Engine_close_session, METH_O, "close_session(session) -> dict"},
    {"close", (PyCFunction)Engine_close, METH_NOARGS, "close every session and stop the threads"},
    {"loop_stats", (PyCFunction)Engine_loop_stats, METH_NOARGS,
     "loop_stats() -> [per-thread dict]: iterations, socket events, writer ticks and their worst times"},
    {"__enter__", (PyCFunction)Engine_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)Engine_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL}};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "rtp_core._core.Engine",
    .tp_basicsize = sizeof(EngineObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Engine(*, bind_ip='127.0.0.1', port_min=20000, port_max=29999, threads=1, io='auto'): native threads "
              "relaying and recording RTP sessions.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
    .tp_getset = Engine_getset,
};

/* ---- module -------------------------------------------------------------------------------- */

static PyMethodDef module_methods[] = {
    {"ulaw_decode", py_ulaw_decode, METH_O, "ulaw_decode(data) -> s16le bytes (G.711 u-law)"},
    {"alaw_decode", py_alaw_decode, METH_O, "alaw_decode(data) -> s16le bytes (G.711 A-law)"},
    {"parse_rtp", py_parse_rtp, METH_O,
     "parse_rtp(datagram) -> (marker, pt, seq, ts, ssrc, payload) or None if it is not valid RTP"},
    {"parse_ipv4_udp", (PyCFunction)(void (*)(void))py_parse_ipv4_udp, METH_VARARGS | METH_KEYWORDS,
     "parse_ipv4_udp(packet, *, csum_known=False) -> (udp offset, udp length), or 'udp checksum' / "
     "'invalid': the packet ring's check of what it receives"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "rtp_core._core",
                                       "rtp_core C media engine", -1, module_methods,
                                       NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__core(void)
{
    PyObject *m;
    rc_g711_init();
    if (PyType_Ready(&RecorderType) < 0 || PyType_Ready(&EngineType) < 0)
        return NULL;
    m = PyModule_Create(&moduledef);
    if (!m)
        return NULL;
    if (PyModule_AddObject(m, "Recorder", Py_NewRef(&RecorderType)) < 0 ||
        PyModule_AddObject(m, "Engine", Py_NewRef(&EngineType)) < 0 ||
        PyModule_AddIntConstant(m, "RATE", RC_RATE) < 0 ||
        PyModule_AddIntConstant(m, "JUMP_SAMPLES", RC_JUMP) < 0 ||
        PyModule_AddIntConstant(m, "HOLD_SAMPLES", RC_HOLD) < 0 ||
        PyModule_AddIntConstant(m, "SEQ_WINDOW", RC_SEQWIN) < 0 ||
        PyModule_AddIntConstant(m, "MAX_DROPOUT", RC_MAX_DROPOUT) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
