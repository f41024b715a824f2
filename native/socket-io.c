/*
 * The sidecar's native socket I/O: read(2) and write(2) on a connected TCP or
 * Unix-domain socket, driven by a uv_poll handle on Node's own event loop.
 *
 * Node's stream path costs about 10 microseconds of CPU per read and write
 * pair on top of the system calls (StreamBase, WriteWrap, Writable, async
 * hooks); PgBouncer spends about 4 in total per transaction. Here a read is
 * one read(2) into a buffer JavaScript lent us, delivered with the other
 * reads of the same poll in one callback, and a write is one write(2) called
 * straight from JavaScript (a run inside a read buffer named by offset and
 * length, with no view made for it). Framing, tracking and pooling stay in
 * TypeScript (src/sidecar/native-socket.ts wraps this).
 *
 * Events are (socket id, kind, value, offset): (EVENT_DATA, bytes, where in
 * the buffer they start), (EVENT_EOF, 0), (EVENT_ERROR, -errno) and
 * (EVENT_WRITABLE, 0). They are queued as the poll phase of the event loop
 * reports the sockets ready, and one JavaScript call delivers all of them
 * right after it (a uv_check handle): entering JavaScript costs about a
 * microsecond of CPU, and under load one poll reports several sockets. Reads
 * into a buffer shared by several sockets (idle clients') go one after the
 * other into it, each at its own offset, until too little of it is left for
 * the next: then what is queued is delivered first. A socket is not read
 * again while a read of its is queued.
 *
 * Built by scripts/build-native.sh against the headers of the Node.js that
 * runs it (Node-API, so any Node.js 24 loads it).
 */
#include <node_api.h>
#include <uv.h>

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

enum { EVENT_DATA = 0, EVENT_EOF = 1, EVENT_ERROR = 2, EVENT_WRITABLE = 3 };

/* Events queued at most before they are delivered regardless (each is four int32: id, kind, value, offset). */
#define QUEUE_EVENTS 1024
#define EVENT_INTS 4
/* A read into a shared buffer is given at least this much of it: with less left, the reads queued in it are delivered first. */
#define SHARED_READ_MIN (16 * 1024)

typedef struct pk_socket pk_socket;
typedef pk_socket *pk_socket_ptr;

/* Per Node.js environment: the queue of events and the one JavaScript function that takes them. */
typedef struct {
  napi_env env;
  uv_check_t check;
  napi_ref dispatch;
  napi_ref queue_ref; /* the Int32Array the events are written into, kept alive here */
  int32_t *queue;     /* [count, then id, kind, value, offset per event] */
  pk_socket_ptr reads[QUEUE_EVENTS]; /* the sockets whose reads are queued */
  int read_count;
  char *shared_base;  /* the shared buffer that queued reads went into */
  size_t shared_used; /* the bytes of it they took */
  napi_async_context context;
  int delivering;
} pk_env;

struct pk_socket {
  uv_poll_t poll;
  int fd;
  int32_t id;
  pk_env *owner;
  char *buffer;
  size_t capacity;
  int shared_buffer; /* buffer is read into by other sockets too: each read at the next free offset */
  int read_queued;   /* a read of this socket waits in the queue: no other until it is delivered */
  int reading;
  int want_writable;
  int polled; /* the events uv_poll is started with */
  int closed;
  /* relay(): reads go straight to this socket, no JavaScript (the bench's floor of a proxy in this event loop). */
  pk_socket_ptr relay_to;
  /* Bytes a relayed read left unsent (relay_to could not take them): reading waits until they are written. */
  char *relay_pending;
  size_t relay_pending_length;
  /* The socket whose relayed bytes wait for this one to become writable. */
  pk_socket_ptr relay_waiting;
};

#define CHECK(call)                                                            \
  do {                                                                         \
    if ((call) != napi_ok) return NULL;                                        \
  } while (0)

static void on_poll(uv_poll_t *poll, int status, int events);
static void relay_read(pk_socket *s);
static void relay_drain(pk_socket *to);

static void update_poll(pk_socket *s) {
  int events = (s->reading ? UV_READABLE : 0) | (s->want_writable ? UV_WRITABLE : 0);
  if (s->closed || events == s->polled) return;
  s->polled = events;
  if (events == 0) uv_poll_stop(&s->poll);
  else uv_poll_start(&s->poll, events, on_poll);
}

/* Delivers the queued events in one call of the dispatch function, as Node calls its own I/O callbacks (ticks and microtasks run after it). */
static void deliver(pk_env *e) {
  int32_t count = e->queue[0];
  if (e->delivering) return;
  if (count == 0) {
    e->shared_used = 0;
    return;
  }
  napi_env env = e->env;
  napi_handle_scope scope;
  if (napi_open_handle_scope(env, &scope) != napi_ok) return;
  e->delivering = 1;
  napi_value callback, result;
  if (napi_get_reference_value(env, e->dispatch, &callback) == napi_ok && callback != NULL) {
    /* The function reads queue[0] events and sets queue[0] to 0; the socket ids tell it whose. */
    if (napi_make_callback(env, e->context, callback, callback, 0, NULL, &result) == napi_pending_exception) {
      /* An exception in the callback is the process's, as for Node's own I/O callbacks. */
      napi_value error;
      napi_get_and_clear_last_exception(env, &error);
      napi_fatal_exception(env, error);
    }
  }
  e->queue[0] = 0;
  /* A closed socket's memory is freed only in the loop's closing phase, after this. */
  for (int i = 0; i < e->read_count; i++) e->reads[i]->read_queued = 0;
  e->read_count = 0;
  /* JavaScript copied what it keeps of the shared buffer's reads. */
  e->shared_used = 0;
  e->delivering = 0;
  napi_close_handle_scope(env, scope);
}

static void enqueue(pk_socket *s, int kind, int value, int offset) {
  pk_env *e = s->owner;
  if (e->queue[0] >= QUEUE_EVENTS) deliver(e);
  /* Only while JavaScript is being called, which no poll interrupts. */
  if (e->queue[0] >= QUEUE_EVENTS) return;
  int32_t *slot = e->queue + 1 + EVENT_INTS * e->queue[0];
  slot[0] = s->id;
  slot[1] = kind;
  slot[2] = value;
  slot[3] = offset;
  e->queue[0] += 1;
  if (kind == EVENT_DATA) {
    s->read_queued = 1;
    e->reads[e->read_count++] = s;
  }
}

static void on_check(uv_check_t *check) {
  deliver((pk_env *)check->data);
}

static void on_poll(uv_poll_t *poll, int status, int events) {
  pk_socket *s = (pk_socket *)poll->data;
  if (s->closed) return;
  if (status < 0) {
    /* libuv says UV_EBADF for any POLLERR: the socket's own error (ECONNRESET...) is the one to report. */
    int error = 0;
    socklen_t length = sizeof error;
    if (getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &error, &length) == 0 && error != 0) status = -error;
    s->reading = 0;
    s->want_writable = 0;
    update_poll(s);
    enqueue(s, EVENT_ERROR, status, 0);
    return;
  }
  if ((events & UV_WRITABLE) && s->want_writable) {
    s->want_writable = 0;
    update_poll(s);
    if (s->relay_waiting != NULL && !s->relay_waiting->closed) relay_drain(s);
    else enqueue(s, EVENT_WRITABLE, 0, 0);
  }
  if ((events & (UV_READABLE | UV_DISCONNECT)) && s->reading && s->relay_to != NULL && s->buffer != NULL && !s->relay_to->closed) {
    relay_read(s);
    return;
  }
  /* Level-triggered: a socket left unread now is reported again by the next poll. */
  if ((events & (UV_READABLE | UV_DISCONNECT)) && s->reading && s->buffer != NULL && !s->read_queued) {
    pk_env *e = s->owner;
    /* Room in the queue first: delivering it also frees the shared buffer. */
    if (e->queue[0] >= QUEUE_EVENTS) deliver(e);
    size_t offset = 0;
    if (s->shared_buffer) {
      size_t least = s->capacity < SHARED_READ_MIN ? s->capacity : SHARED_READ_MIN;
      if (e->shared_used > 0 && (e->shared_base != s->buffer || s->capacity - e->shared_used < least)) deliver(e);
      if (e->shared_used == 0) e->shared_base = s->buffer;
      /* Only while JavaScript is being called: read at the next poll. */
      if (e->shared_base != s->buffer || s->capacity - e->shared_used < least) return;
      offset = e->shared_used;
    }
    ssize_t n;
    do n = read(s->fd, s->buffer + offset, s->capacity - offset);
    while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    if (n <= 0) {
      int error = n == 0 ? 0 : -errno;
      s->reading = 0;
      update_poll(s);
      enqueue(s, n == 0 ? EVENT_EOF : EVENT_ERROR, error, 0);
      return;
    }
    if (s->shared_buffer) e->shared_used = offset + (size_t)n;
    enqueue(s, EVENT_DATA, (int)n, (int)offset);
  }
}

static ssize_t send_all_once(int fd, const char *data, size_t length) {
  ssize_t n;
  do n = send(fd, data, length, MSG_NOSIGNAL);
  while (n < 0 && errno == EINTR);
  return n;
}

/* A relayed socket is readable: read, send on, and on a short send keep the rest and stop reading until its peer drains. */
static void relay_read(pk_socket *s) {
  pk_socket *to = s->relay_to;
  ssize_t n;
  do n = read(s->fd, s->buffer, s->capacity);
  while (n < 0 && errno == EINTR);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
  if (n <= 0) {
    s->reading = 0;
    update_poll(s);
    enqueue(s, n == 0 ? EVENT_EOF : EVENT_ERROR, n == 0 ? 0 : -errno, 0);
    return;
  }
  ssize_t sent = send_all_once(to->fd, s->buffer, (size_t)n);
  if (sent < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
    enqueue(to, EVENT_ERROR, -errno, 0);
    return;
  }
  if (sent == n) return;
  size_t rest = (size_t)n - (size_t)(sent < 0 ? 0 : sent);
  s->relay_pending = malloc(rest);
  if (s->relay_pending == NULL) {
    enqueue(s, EVENT_ERROR, -ENOMEM, 0);
    return;
  }
  memcpy(s->relay_pending, s->buffer + (n - (ssize_t)rest), rest);
  s->relay_pending_length = rest;
  s->reading = 0;
  update_poll(s);
  to->relay_waiting = s;
  to->want_writable = 1;
  update_poll(to);
}

/* The peer of a relayed socket can take more: send what waits, then read again. */
static void relay_drain(pk_socket *to) {
  pk_socket *s = to->relay_waiting;
  ssize_t sent = send_all_once(to->fd, s->relay_pending, s->relay_pending_length);
  if (sent < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
    to->relay_waiting = NULL;
    enqueue(to, EVENT_ERROR, -errno, 0);
    return;
  }
  size_t done = sent < 0 ? 0 : (size_t)sent;
  if (done < s->relay_pending_length) {
    memmove(s->relay_pending, s->relay_pending + done, s->relay_pending_length - done);
    s->relay_pending_length -= done;
    to->want_writable = 1;
    update_poll(to);
    return;
  }
  free(s->relay_pending);
  s->relay_pending = NULL;
  s->relay_pending_length = 0;
  to->relay_waiting = NULL;
  s->reading = 1;
  update_poll(s);
}

static pk_socket *unwrap(napi_env env, napi_value value) {
  void *data = NULL;
  if (napi_get_value_external(env, value, &data) != napi_ok) return NULL;
  return (pk_socket *)data;
}

static int get_args(napi_env env, napi_callback_info info, size_t expected, napi_value *argv) {
  size_t argc = expected;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < expected) {
    napi_throw_type_error(env, NULL, "wrong number of arguments");
    return 0;
  }
  return 1;
}

/* The first `count` arguments, the first being an open socket; NULL if it is closed (or the arguments are wrong). */
static pk_socket *socket_args(napi_env env, napi_callback_info info, size_t count, napi_value *argv) {
  if (!get_args(env, info, count, argv)) return NULL;
  pk_socket *s = unwrap(env, argv[0]);
  return s == NULL || s->closed ? NULL : s;
}

static napi_value int_value(napi_env env, int value) {
  napi_value out;
  CHECK(napi_create_int32(env, value, &out));
  return out;
}

static void on_check_closed(uv_handle_t *handle) {
  free(handle->data);
}

/* The environment ends (a worker thread, or the process): the queue's memory goes once libuv lets go of its handle. */
static void on_env_cleanup(void *data) {
  pk_env *e = (pk_env *)data;
  uv_close((uv_handle_t *)&e->check, on_check_closed);
}

/*
 * listen(dispatch, queue): every event of every socket goes to `dispatch()`,
 * which reads them from the Int32Array `queue` (queueEvents * 4 + 1 long):
 * queue[0] events, then id, kind, value, offset for each. Called once, before open().
 */
static napi_value Listen(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (!get_args(env, info, 2, argv)) return NULL;
  void *existing = NULL;
  if (napi_get_instance_data(env, &existing) == napi_ok && existing != NULL) {
    napi_throw_error(env, NULL, "listen() was already called");
    return NULL;
  }
  napi_typedarray_type type;
  size_t length;
  void *data;
  CHECK(napi_get_typedarray_info(env, argv[1], &type, &length, &data, NULL, NULL));
  if (type != napi_int32_array || length < 1 + EVENT_INTS * QUEUE_EVENTS) {
    napi_throw_type_error(env, NULL, "listen(dispatch, queue): queue must be an Int32Array of queueEvents * 4 + 1 elements");
    return NULL;
  }
  pk_env *e = calloc(1, sizeof *e);
  if (e == NULL) {
    napi_throw_error(env, NULL, "out of memory");
    return NULL;
  }
  e->env = env;
  e->queue = (int32_t *)data;
  e->queue[0] = 0;
  uv_loop_t *loop;
  napi_value name, resource;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok || uv_check_init(loop, &e->check) != 0) {
    free(e);
    napi_throw_error(env, NULL, "could not watch the event loop");
    return NULL;
  }
  e->check.data = e;
  /* It runs after every poll, but never keeps the process alive by itself. */
  uv_check_start(&e->check, on_check);
  uv_unref((uv_handle_t *)&e->check);
  if (napi_create_reference(env, argv[0], 1, &e->dispatch) != napi_ok || napi_create_reference(env, argv[1], 1, &e->queue_ref) != napi_ok ||
      napi_create_string_utf8(env, "poolkeeper.socket", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_object(env, &resource) != napi_ok || napi_async_init(env, resource, name, &e->context) != napi_ok ||
      napi_add_env_cleanup_hook(env, on_env_cleanup, e) != napi_ok || napi_set_instance_data(env, e, NULL, NULL) != napi_ok) {
    napi_throw_error(env, NULL, "could not set up the socket events");
    return NULL;
  }
  return NULL;
}

/* open(fd, id): takes a duplicate of fd (the caller closes its own), non-blocking; its events carry `id`. */
static napi_value Open(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (!get_args(env, info, 2, argv)) return NULL;
  int32_t fd, id;
  CHECK(napi_get_value_int32(env, argv[0], &fd));
  CHECK(napi_get_value_int32(env, argv[1], &id));
  pk_env *owner = NULL;
  if (napi_get_instance_data(env, (void **)&owner) != napi_ok || owner == NULL) {
    napi_throw_error(env, NULL, "listen() must be called before open()");
    return NULL;
  }
  int own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (own < 0) {
    napi_throw_error(env, NULL, "dup of the socket failed");
    return NULL;
  }
  int flags = fcntl(own, F_GETFL);
  if (flags >= 0) fcntl(own, F_SETFL, flags | O_NONBLOCK);
  pk_socket *s = calloc(1, sizeof *s);
  if (s == NULL) {
    close(own);
    napi_throw_error(env, NULL, "out of memory");
    return NULL;
  }
  s->fd = own;
  s->id = id;
  s->owner = owner;
  uv_loop_t *loop;
  napi_value out;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok || uv_poll_init(loop, &s->poll, own) != 0 ||
      napi_create_external(env, s, NULL, NULL, &out) != napi_ok) {
    close(own);
    free(s);
    napi_throw_error(env, NULL, "could not watch the socket");
    return NULL;
  }
  s->poll.data = s;
  return out;
}

/*
 * setBuffer(socket, buffer, shared): reads go into buffer from now on;
 * `shared`: other sockets read into it too, so each read takes the next free
 * offset in it until the queued events are delivered.
 * No reference is taken (one per switch would cost two global handles per
 * transaction): the caller keeps the buffer alive while it is set
 * (NativeSocket holds it), and a Buffer's backing store never moves.
 */
static napi_value SetBuffer(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  pk_socket *s = socket_args(env, info, 3, argv);
  if (s == NULL) return NULL;
  void *data;
  size_t length;
  bool shared;
  CHECK(napi_get_buffer_info(env, argv[1], &data, &length));
  CHECK(napi_get_value_bool(env, argv[2], &shared));
  s->buffer = (char *)data;
  s->capacity = length;
  s->shared_buffer = shared ? 1 : 0;
  return NULL;
}

/* reading(socket, on): starts or stops reading. */
static napi_value Reading(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  pk_socket *s = socket_args(env, info, 2, argv);
  bool on;
  if (s == NULL) return NULL;
  CHECK(napi_get_value_bool(env, argv[1], &on));
  s->reading = on ? 1 : 0;
  update_poll(s);
  return NULL;
}

/*
 * write(socket, buffer[, offset, length]): one send(2) of the buffer, or of
 * `length` bytes of it from `offset` (a run inside a read buffer, with no view
 * made for it). Undefined if every byte went (nothing to create for the
 * usual case), else the bytes written, or -errno (-EAGAIN: none).
 */
static napi_value Write(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  size_t argc = 4;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 2 || argc == 3) {
    napi_throw_type_error(env, NULL, "write(socket, buffer[, offset, length])");
    return NULL;
  }
  pk_socket *s = unwrap(env, argv[0]);
  if (s == NULL || s->closed) return int_value(env, -EBADF);
  void *data;
  size_t length;
  CHECK(napi_get_buffer_info(env, argv[1], &data, &length));
  if (argc == 4) {
    int32_t offset, count;
    CHECK(napi_get_value_int32(env, argv[2], &offset));
    CHECK(napi_get_value_int32(env, argv[3], &count));
    if (offset < 0 || count < 0 || (size_t)offset + (size_t)count > length) {
      napi_throw_range_error(env, NULL, "write: offset and length beyond the buffer");
      return NULL;
    }
    data = (char *)data + offset;
    length = (size_t)count;
  }
  ssize_t n;
  do n = send(s->fd, data, length, MSG_NOSIGNAL);
  while (n < 0 && errno == EINTR);
  if (n < 0 && errno == ENOTSOCK) {
    do n = write(s->fd, data, length);
    while (n < 0 && errno == EINTR);
  }
  if (n >= 0 && (size_t)n == length) return NULL;
  return int_value(env, n < 0 ? -errno : (int)n);
}

/* waitWritable(socket): one EVENT_WRITABLE once the socket can take more. */
static napi_value WaitWritable(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  pk_socket *s = socket_args(env, info, 1, argv);
  if (s == NULL) return NULL;
  s->want_writable = 1;
  update_poll(s);
  return NULL;
}

/* shutdown(socket): ends the sending side (FIN); 0 or -errno. */
static napi_value Shutdown(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  pk_socket *s = socket_args(env, info, 1, argv);
  if (s == NULL) return int_value(env, -EBADF);
  return int_value(env, shutdown(s->fd, SHUT_WR) < 0 ? -errno : 0);
}

/* setNoDelay(socket, on): TCP_NODELAY; 0 or -errno (a Unix-domain socket has none). */
static napi_value SetNoDelay(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  pk_socket *s = socket_args(env, info, 2, argv);
  bool on;
  if (s == NULL) return int_value(env, -EBADF);
  CHECK(napi_get_value_bool(env, argv[1], &on));
  int value = on ? 1 : 0;
  return int_value(env, setsockopt(s->fd, IPPROTO_TCP, TCP_NODELAY, &value, sizeof value) < 0 ? -errno : 0);
}

/*
 * relay(from, to): from now on every read of `from` is sent to `to` here, in
 * C, with no JavaScript; only the end or an error of either is delivered.
 * `from` must have a buffer of its own (not shared). Not used by the sidecar:
 * the bench's `c-relay` measures with it what a proxy in this event loop costs
 * at least, without JavaScript per read. Close both sockets together.
 */
static napi_value Relay(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  pk_socket *s = socket_args(env, info, 2, argv);
  if (s == NULL) return NULL;
  pk_socket *to = unwrap(env, argv[1]);
  if (to == NULL || to->closed) {
    napi_throw_type_error(env, NULL, "relay(from, to): `to` must be an open socket");
    return NULL;
  }
  if (s->shared_buffer) {
    napi_throw_type_error(env, NULL, "relay(from, to): `from` must read into a buffer of its own");
    return NULL;
  }
  s->relay_to = to;
  return NULL;
}

static void on_closed(uv_handle_t *handle) {
  pk_socket *s = (pk_socket *)handle->data;
  close(s->fd);
  free(s->relay_pending);
  free(s);
}

/* close(socket): no event after this (one already queued is delivered; the caller ignores it); the descriptor closes once libuv lets go of it. */
static napi_value Close(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  pk_socket *s = socket_args(env, info, 1, argv);
  if (s == NULL) return NULL;
  s->closed = 1;
  s->reading = 0;
  s->want_writable = 0;
  s->buffer = NULL;
  uv_close((uv_handle_t *)&s->poll, on_closed);
  return NULL;
}

/*
 * Node turns on libuv's idle-time metrics at start-up (for
 * performance.eventLoopUtilization()). libuv then polls once without waiting
 * before every wait, to time the wait alone: one more epoll_pwait(2) and two
 * clock reads each time the loop goes idle, about every read of a sidecar at
 * low concurrency. The sidecar reads no event-loop utilization, so it turns
 * them off. The flags are the first field of the loop's internal fields in
 * every libuv since the metrics came (1.39); other versions are left alone.
 * Returns whether they were turned off.
 */
static napi_value QuietLoop(napi_env env, napi_callback_info info) {
  (void)info;
  uv_loop_t *loop;
  unsigned int version = uv_version();
  int quiet = version >= ((1u << 16) | (39u << 8)) && version < (2u << 16) &&
              napi_get_uv_event_loop(env, &loop) == napi_ok && loop->internal_fields != NULL;
  if (quiet) *(unsigned int *)loop->internal_fields &= ~(unsigned int)UV_METRICS_IDLE_TIME;
  napi_value out;
  CHECK(napi_get_boolean(env, quiet, &out));
  return out;
}

/*
 * tcpKeepalive(fd, idleSeconds, intervalSeconds, count, userTimeoutMs) -> 0 or -errno.
 * Keepalive probes after `idleSeconds` of silence, every `intervalSeconds`,
 * `count` of them; and TCP_USER_TIMEOUT, so that data the peer never
 * acknowledges (a powered-off host, a cut network) ends the connection too,
 * where the kernel would otherwise retransmit for about fifteen minutes.
 * Node sets only the first of these (and libuv fixes the interval and count).
 */
static napi_value TcpKeepalive(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  if (!get_args(env, info, 5, argv)) return NULL;
  int32_t fd, idle, interval, count, user_timeout;
  if (napi_get_value_int32(env, argv[0], &fd) != napi_ok || napi_get_value_int32(env, argv[1], &idle) != napi_ok ||
      napi_get_value_int32(env, argv[2], &interval) != napi_ok || napi_get_value_int32(env, argv[3], &count) != napi_ok ||
      napi_get_value_int32(env, argv[4], &user_timeout) != napi_ok) {
    napi_throw_type_error(env, NULL, "tcpKeepalive(fd, idleSeconds, intervalSeconds, count, userTimeoutMs): numbers expected");
    return NULL;
  }
  int on = 1;
  unsigned int timeout = (unsigned int)user_timeout;
  int result = 0;
  if (setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof on) != 0 ||
      setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle) != 0 ||
      setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof interval) != 0 ||
      setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &count, sizeof count) != 0 ||
      setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &timeout, sizeof timeout) != 0)
    result = -errno;
  return int_value(env, result);
}

static int export_function(napi_env env, napi_value exports, const char *name, napi_callback callback) {
  napi_value fn;
  return napi_create_function(env, name, NAPI_AUTO_LENGTH, callback, NULL, &fn) == napi_ok &&
         napi_set_named_property(env, exports, name, fn) == napi_ok;
}

NAPI_MODULE_INIT() {
  if (!export_function(env, exports, "listen", Listen) || !export_function(env, exports, "open", Open) || !export_function(env, exports, "setBuffer", SetBuffer) ||
      !export_function(env, exports, "reading", Reading) || !export_function(env, exports, "write", Write) ||
      !export_function(env, exports, "waitWritable", WaitWritable) || !export_function(env, exports, "shutdown", Shutdown) ||
      !export_function(env, exports, "setNoDelay", SetNoDelay) || !export_function(env, exports, "close", Close) || !export_function(env, exports, "quietLoop", QuietLoop) ||
      !export_function(env, exports, "tcpKeepalive", TcpKeepalive) || !export_function(env, exports, "relay", Relay))
    return NULL;
  napi_value queue_events;
  if (napi_create_int32(env, QUEUE_EVENTS, &queue_events) != napi_ok || napi_set_named_property(env, exports, "queueEvents", queue_events) != napi_ok)
    return NULL;
  return exports;
}
