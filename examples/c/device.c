/* A minimal ingest device in C over libzmq: no SDK, only docs/PROTOCOL.md.
 *
 *   device push BOOTSTRAP TOPIC DEVICE_ID COUNT   fire-and-forget readings (PUSH, acks 0)
 *   device send BOOTSTRAP TOPIC DEVICE_ID COUNT   acked, idempotent batches (DEALER, acks fsync)
 *   device raw  BOOTSTRAP TOPIC COUNT             the topic's raw listener: one frame, one value
 *
 * Every reading is the JSON value {"device":"DEVICE_ID","seq":N,"temp_c":T} with the
 * device id as its key, so that all readings of one device land, in order, in one
 * partition (murmur2(key) % partitions, as Kafka does).
 *
 * `send` is what firmware that must not lose a reading does: it packs readings into a
 * Kafka RecordBatch v2 that carries a producer id and a sequence number (PROTOCOL.md
 * section 8), sends it on a DEALER socket with acks=fsync, and resends the very same
 * batch after a timeout or a retriable error. The appliance answers a resent batch it
 * already stored with the original offsets, so a retry never stores a reading twice.
 *
 * Build: make (needs libzmq3-dev). Exit status: 0 done, 1 the appliance refused,
 * 2 usage, 3 the appliance did not answer within the retry budget.
 */
#define _POSIX_C_SOURCE 200809L

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <zmq.h>

/* ---- protocol constants (PROTOCOL.md sections 3, 4, 6) -------------------------------- */

enum { PROTOCOL_VERSION = 1 };
enum { MSG_RECORD = 0x01, MSG_BATCH = 0x02, MSG_METADATA = 0x07, MSG_CREATE_TOPIC = 0x08,
       REPLY_BIT = 0x80 };
enum { ACKS_NONE = 0, ACKS_FSYNC = 2, FLAG_TIMESTAMP = 1 << 3 };
enum { HEADER_BYTES = 8, REPLY_HEADER_BYTES = 12, RECORD_FIXED_BYTES = 28,
       BATCH_FIXED_BYTES = 16, PRODUCE_REPLY_BYTES = 36, ERROR_REPLY_FIXED_BYTES = 16 };
enum { AUTO_PARTITION = -1 };
enum { ERR_NONE = 0, ERR_UNKNOWN_TOPIC_OR_PARTITION = 2, ERR_NOT_OWNER = 3, ERR_THROTTLED = 5,
       ERR_DISK_FULL = 6, ERR_TIMEOUT = 12, ERR_NOT_ENOUGH_REPLICAS = 13,
       ERR_SHUTTING_DOWN = 16 };

/* ---- bounds of this device ---------------------------------------------------------- */

/* Readings per acked batch: one request per ten readings, small enough for a frame
 * buffer on the stack of a microcontroller-class gateway. */
enum { BATCH_RECORDS_MAX = 10 };
enum { VALUE_BYTES_MAX = 96, KEY_BYTES_MAX = 64, TOPIC_BYTES_MAX = 249 };
enum { FRAME_BYTES_MAX = 4096 };
/* The metadata document grows with workers and topics; a device needs only a little. */
enum { METADATA_BYTES_MAX = 1 << 16 };
/* A request with no reply after this long is resent (the worker may be restarting). */
enum { REQUEST_TIMEOUT_MS = 1000 };
/* Attempts per batch before the device gives up: 60 x (1 s timeout or backoff). */
enum { ATTEMPTS_MAX = 60 };
enum { BACKOFF_MS = 200 };
/* PUSH: readings queued while the appliance is unreachable before zmq_send blocks, and
 * how long closing waits to deliver what is queued. */
enum { PUSH_SNDHWM = 10000, PUSH_LINGER_MS = 10000 };

static void *context;

/* ---- little helpers ------------------------------------------------------------------ */

static void die(int status, const char *message) {
    fprintf(stderr, "device: %s\n", message);
    exit(status);
}

static int64_t now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static void sleep_ms(int ms) {
    struct timespec t = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

/* The wire protocol is little-endian; the embedded Kafka RecordBatch is big-endian.
 * Writing byte by byte keeps both right on any CPU and needs no alignment. */
static uint8_t *put_le(uint8_t *p, uint64_t v, int bytes) {
    for (int i = 0; i < bytes; i++) p[i] = (uint8_t)(v >> (8 * i));
    return p + bytes;
}

static uint8_t *put_be(uint8_t *p, uint64_t v, int bytes) {
    for (int i = 0; i < bytes; i++) p[i] = (uint8_t)(v >> (8 * (bytes - 1 - i)));
    return p + bytes;
}

static uint64_t get_le(const uint8_t *p, int bytes) {
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static uint8_t *put_header(uint8_t *p, int msg_type, int flags, uint32_t correlation_id) {
    *p++ = PROTOCOL_VERSION;
    *p++ = (uint8_t)msg_type;
    p = put_le(p, (uint64_t)flags, 2);
    return put_le(p, correlation_id, 4);
}

/* ---- Kafka's murmur2 partitioner (org.apache.kafka.common.utils.Utils.murmur2) ------ */

static int partition_for_key(const char *key, size_t length, int partitions) {
    const uint32_t m = 0x5bd1e995;
    uint32_t h = 0x9747b28c ^ (uint32_t)length;
    const uint8_t *data = (const uint8_t *)key;
    size_t i = 0;
    for (; i + 4 <= length; i += 4) {
        uint32_t k = (uint32_t)data[i] | (uint32_t)data[i + 1] << 8 |
                     (uint32_t)data[i + 2] << 16 | (uint32_t)data[i + 3] << 24;
        k *= m; k ^= k >> 24; k *= m;
        h *= m; h ^= k;
    }
    switch (length - i) {
    case 3: h ^= (uint32_t)data[i + 2] << 16; /* fall through */
    case 2: h ^= (uint32_t)data[i + 1] << 8;  /* fall through */
    case 1: h ^= data[i]; h *= m;
    }
    h ^= h >> 13; h *= m; h ^= h >> 15;
    return (int)((h & 0x7fffffff) % (uint32_t)partitions);
}

/* ---- CRC32C (Castagnoli), the checksum of a RecordBatch ---------------------------- */

static uint32_t crc32c(const uint8_t *data, size_t length) {
    static uint32_t table[256];
    if (!table[1]) {
        for (uint32_t n = 0; n < 256; n++) {
            uint32_t c = n;
            for (int k = 0; k < 8; k++) c = (c & 1) ? 0x82f63b78 ^ (c >> 1) : c >> 1;
            table[n] = c;
        }
    }
    uint32_t crc = 0xffffffff;
    for (size_t i = 0; i < length; i++) crc = table[(crc ^ data[i]) & 0xff] ^ (crc >> 8);
    return crc ^ 0xffffffff;
}

/* Kafka's varint: zigzag, then base 128, low group first. */
static uint8_t *put_varint(uint8_t *p, int64_t v) {
    uint64_t z = ((uint64_t)v << 1) ^ (uint64_t)(v >> 63);
    while (z >= 0x80) { *p++ = (uint8_t)(z | 0x80); z >>= 7; }
    *p++ = (uint8_t)z;
    return p;
}

/* ---- a JSON reader just big enough for the METADATA document ------------------------ *
 * Values are located, not copied: each function takes a pointer to the first character
 * of a value and returns one past its end (NULL if the text is not JSON). */

static const char *skip_ws(const char *p) {
    while (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t') p++;
    return p;
}

static const char *skip_value(const char *p);

static const char *skip_string(const char *p) {
    if (*p++ != '"') return NULL;
    for (; *p && *p != '"'; p++)
        if (*p == '\\' && !*++p) return NULL;
    return *p ? p + 1 : NULL;
}

static const char *skip_container(const char *p, char close) {
    p = skip_ws(p + 1);
    if (*p == close) return p + 1;
    for (;;) {
        if (close == '}') {
            p = skip_string(p);
            if (!p || *(p = skip_ws(p)) != ':') return NULL;
            p = skip_ws(p + 1);
        }
        if (!(p = skip_value(p))) return NULL;
        p = skip_ws(p);
        if (*p == close) return p + 1;
        if (*p != ',') return NULL;
        p = skip_ws(p + 1);
    }
}

static const char *skip_value(const char *p) {
    p = skip_ws(p);
    if (*p == '"') return skip_string(p);
    if (*p == '{') return skip_container(p, '}');
    if (*p == '[') return skip_container(p, ']');
    const char *start = p;  /* number, true, false, null */
    while (*p && !strchr(",}] \n\r\t", *p)) p++;
    return p > start ? p : NULL;
}

/* The value of `key` in the object at p, or NULL. */
static const char *json_get(const char *p, const char *key) {
    p = skip_ws(p);
    if (*p != '{') return NULL;
    p = skip_ws(p + 1);
    size_t key_length = strlen(key);
    while (*p == '"') {
        const char *end = skip_string(p);
        if (!end) return NULL;
        int match = (size_t)(end - p - 2) == key_length && !memcmp(p + 1, key, key_length);
        p = skip_ws(end);
        if (*p != ':') return NULL;
        p = skip_ws(p + 1);
        if (match) return p;
        if (!(p = skip_value(p))) return NULL;
        p = skip_ws(p);
        if (*p == ',') p = skip_ws(p + 1);
    }
    return NULL;
}

/* Element i of the array at p, or NULL. */
static const char *json_at(const char *p, int i) {
    p = skip_ws(p);
    if (*p != '[') return NULL;
    p = skip_ws(p + 1);
    for (; *p && *p != ']'; i--) {
        if (!i) return p;
        if (!(p = skip_value(p))) return NULL;
        p = skip_ws(p);
        if (*p == ',') p = skip_ws(p + 1);
    }
    return NULL;
}

static int json_int(const char *p, long *out) {
    char *end;
    if (!p) return 0;
    *out = strtol(p, &end, 10);
    return end != p;
}

/* Copies the string at p (endpoints and names need no unescaping) into out. */
static int json_string(const char *p, char *out, size_t size) {
    const char *end = p ? skip_string(p) : NULL;
    if (!end || (size_t)(end - p - 2) >= size || memchr(p + 1, '\\', (size_t)(end - p - 2)))
        return 0;
    memcpy(out, p + 1, (size_t)(end - p - 2));
    out[end - p - 2] = 0;
    return 1;
}

/* ---- request / reply on a DEALER socket --------------------------------------------- */

static uint32_t next_correlation_id = 1;

/* Sends the frame once with a fresh correlation id and waits up to REQUEST_TIMEOUT_MS
 * for the reply that carries it. Replies may come in any order, and a late reply to an
 * earlier attempt may still arrive: anything with another id is dropped. Returns the
 * reply's length, or -1 on timeout. */
static int request(void *dealer, uint8_t *frame, size_t length, uint8_t *reply, size_t size) {
    uint32_t correlation_id = next_correlation_id++;
    put_le(frame + 4, correlation_id, 4);
    if (zmq_send(dealer, frame, length, 0) < 0) die(3, zmq_strerror(zmq_errno()));
    int64_t deadline = now_ms() + REQUEST_TIMEOUT_MS;
    for (int64_t left; (left = deadline - now_ms()) > 0;) {
        zmq_pollitem_t item = {dealer, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(&item, 1, (long)left) <= 0) continue;
        int n = zmq_recv(dealer, reply, size, 0);  /* n > size: the frame was cut to size */
        if (n < REPLY_HEADER_BYTES) continue;      /* not a reply */
        if (reply[1] != (frame[1] | REPLY_BIT) || get_le(reply + 4, 4) != correlation_id)
            continue;                              /* a late reply to an earlier attempt */
        if ((size_t)n > size) die(1, "the reply is larger than this device's buffer");
        return n;
    }
    return -1;
}

static void *dealer_to(const char *endpoint) {
    void *s = zmq_socket(context, ZMQ_DEALER);
    int linger_ms = 0;  /* an unanswered request is not worth waiting for at exit */
    zmq_setsockopt(s, ZMQ_LINGER, &linger_ms, sizeof linger_ms);
    if (zmq_connect(s, endpoint) != 0) die(2, "cannot connect: check the endpoint");
    return s;
}

static int error_code(const uint8_t *reply) { return (int)get_le(reply + 8, 2); }

static void print_error(const uint8_t *reply, int n) {
    int length = n - ERROR_REPLY_FIXED_BYTES;
    fprintf(stderr, "device: error %d: %.*s\n", error_code(reply), length > 0 ? length : 0,
            (const char *)reply + ERROR_REPLY_FIXED_BYTES);
}

/* The METADATA document, NUL-terminated, from the bootstrap endpoint. */
static char *metadata(const char *bootstrap, int msg_type, const char *body) {
    static uint8_t reply[METADATA_BYTES_MAX + 1];
    uint8_t frame[HEADER_BYTES + 512];
    size_t body_bytes = strlen(body);
    if (body_bytes > sizeof frame - HEADER_BYTES) die(2, "request too long");
    put_header(frame, msg_type, 0, 0);
    memcpy(frame + HEADER_BYTES, body, body_bytes);
    void *s = dealer_to(bootstrap);
    for (int attempt = 0; attempt < ATTEMPTS_MAX; attempt++) {
        int n = request(s, frame, HEADER_BYTES + body_bytes, reply, METADATA_BYTES_MAX);
        if (n < 0) continue;
        zmq_close(s);
        if (error_code(reply) != ERR_NONE) {
            print_error(reply, n);
            exit(1);
        }
        reply[n] = 0;
        return (char *)reply + REPLY_HEADER_BYTES;
    }
    die(3, "the bootstrap endpoint does not answer: is `ingest serve` running?");
    return NULL;
}

/* Worker `id`'s endpoint (`which` is "pull" or "router") from the metadata. */
static void worker_endpoint(const char *meta, int id, const char *which, char *out, size_t size) {
    const char *workers = json_get(meta, "workers");
    for (int i = 0;; i++) {
        const char *w = json_at(workers, i);
        long wid;
        if (!w) die(1, "the metadata names no such worker");
        if (json_int(json_get(w, "id"), &wid) && wid == id) {
            if (!json_string(json_get(w, which), out, size)) die(1, "unreadable worker endpoint");
            return;
        }
    }
}

/* ---- encoding readings ---------------------------------------------------------------- */

static int reading(char *out, const char *device_id, long seq) {
    return snprintf(out, VALUE_BYTES_MAX, "{\"device\":\"%s\",\"seq\":%ld,\"temp_c\":%.1f}",
                    device_id, seq, 20.0 + (double)(seq % 50) / 10);
}

/* One RECORD frame (PROTOCOL.md 5.1): no headers, timestamp set, partition chosen by the
 * appliance from the key. */
static size_t encode_record(uint8_t *frame, const char *topic, const char *key,
                            const char *value, int acks, int64_t timestamp_ms) {
    size_t topic_bytes = strlen(topic), key_bytes = strlen(key), value_bytes = strlen(value);
    uint8_t *p = put_header(frame, MSG_RECORD, acks | FLAG_TIMESTAMP, 0);
    *p++ = (uint8_t)topic_bytes;
    *p++ = 0;                                     /* reserved */
    p = put_le(p, 0, 2);                          /* header_count */
    p = put_le(p, (uint64_t)key_bytes, 4);
    p = put_le(p, (uint64_t)timestamp_ms, 8);
    p = put_le(p, (uint64_t)(int64_t)AUTO_PARTITION, 4);
    memcpy(p, topic, topic_bytes); p += topic_bytes;
    memcpy(p, key, key_bytes); p += key_bytes;
    memcpy(p, value, value_bytes); p += value_bytes;
    return (size_t)(p - frame);
}

/* One Kafka RecordBatch v2 (PROTOCOL.md 8.1, big-endian) holding `count` readings
 * numbered from `first_seq`, all stamped `timestamp_ms`, idempotent: producerId, epoch 0,
 * baseSequence. Returns its length. */
static size_t encode_record_batch(uint8_t *out, const char *key, const char *device_id,
                                  long first_seq, int count, int64_t producer_id,
                                  int32_t base_sequence, int64_t timestamp_ms) {
    uint8_t *p = out + 61;                        /* records follow the 61-byte header */
    for (int i = 0; i < count; i++) {
        char value[VALUE_BYTES_MAX];
        int value_bytes = reading(value, device_id, first_seq + i);
        int key_bytes = (int)strlen(key);
        uint8_t body[KEY_BYTES_MAX + VALUE_BYTES_MAX + 32], *b = body;
        *b++ = 0;                                 /* attributes */
        b = put_varint(b, 0);                     /* timestampDelta */
        b = put_varint(b, i);                     /* offsetDelta */
        b = put_varint(b, key_bytes);
        memcpy(b, key, (size_t)key_bytes); b += key_bytes;
        b = put_varint(b, value_bytes);
        memcpy(b, value, (size_t)value_bytes); b += value_bytes;
        b = put_varint(b, 0);                     /* headersCount */
        p = put_varint(p, b - body);
        memcpy(p, body, (size_t)(b - body)); p += b - body;
    }
    size_t length = (size_t)(p - out);
    uint8_t *h = put_be(out, 0, 8);               /* baseOffset: the appliance assigns it */
    h = put_be(h, length - 12, 4);                /* batchLength */
    h = put_be(h, (uint64_t)-1, 4);               /* partitionLeaderEpoch */
    *h++ = 2;                                     /* magic */
    uint8_t *crc = h; h += 4;
    h = put_be(h, 0, 2);                          /* attributes: no compression, CreateTime */
    h = put_be(h, (uint64_t)(count - 1), 4);      /* lastOffsetDelta */
    h = put_be(h, (uint64_t)timestamp_ms, 8);     /* baseTimestamp */
    h = put_be(h, (uint64_t)timestamp_ms, 8);     /* maxTimestamp */
    h = put_be(h, (uint64_t)producer_id, 8);
    h = put_be(h, 0, 2);                          /* producerEpoch */
    h = put_be(h, (uint64_t)(uint32_t)base_sequence, 4);
    h = put_be(h, (uint64_t)count, 4);            /* recordsCount */
    put_be(crc, crc32c(crc + 4, length - 21), 4); /* CRC over attributes..end */
    return length;
}

/* ---- the three commands --------------------------------------------------------------- */

static int cmd_push(const char *bootstrap, const char *topic, const char *device_id, long count) {
    char endpoint[256];
    const char *meta = metadata(bootstrap, MSG_METADATA, "");
    worker_endpoint(meta, 0, "pull", endpoint, sizeof endpoint);  /* any worker forwards */
    void *push = zmq_socket(context, ZMQ_PUSH);
    int hwm = PUSH_SNDHWM, linger_ms = PUSH_LINGER_MS;
    zmq_setsockopt(push, ZMQ_SNDHWM, &hwm, sizeof hwm);
    zmq_setsockopt(push, ZMQ_LINGER, &linger_ms, sizeof linger_ms);
    if (zmq_connect(push, endpoint) != 0) die(1, "cannot connect to the worker's push endpoint");
    for (long seq = 0; seq < count; seq++) {
        char value[VALUE_BYTES_MAX];
        uint8_t frame[FRAME_BYTES_MAX];
        reading(value, device_id, seq);
        size_t n = encode_record(frame, topic, device_id, value, ACKS_NONE, now_ms());
        if (zmq_send(push, frame, n, 0) < 0) die(3, zmq_strerror(zmq_errno()));
    }
    zmq_close(push);  /* waits up to PUSH_LINGER_MS for queued readings to leave */
    printf("pushed %ld readings\n", count);
    return 0;
}

static int retriable(int code) {
    return code == ERR_NOT_OWNER || code == ERR_THROTTLED || code == ERR_DISK_FULL ||
           code == ERR_TIMEOUT || code == ERR_NOT_ENOUGH_REPLICAS || code == ERR_SHUTTING_DOWN;
}

/* Partition count of `topic`, created with the appliance's default count if missing. */
static int partitions_of(const char *bootstrap, const char *topic, int *created) {
    long partitions, workers;
    const char *meta = metadata(bootstrap, MSG_METADATA, "");
    *created = 0;
    if (!json_int(json_get(json_get(json_get(meta, "topics"), topic), "partitions"), &partitions)) {
        char body[TOPIC_BYTES_MAX + 64];
        if (!json_int(json_get(meta, "default_partitions"), &partitions) || partitions <= 0)
            partitions = json_int(json_get(meta, "worker_count"), &workers) ? workers : 1;
        snprintf(body, sizeof body, "{\"topic\":\"%s\",\"partitions\":%ld}", topic, partitions);
        metadata(bootstrap, MSG_CREATE_TOPIC, body);  /* an existing topic is not an error */
        *created = 1;
        meta = metadata(bootstrap, MSG_METADATA, "");
        if (!json_int(json_get(json_get(json_get(meta, "topics"), topic), "partitions"), &partitions))
            die(1, "the topic was not created");
    }
    return (int)partitions;
}

static int64_t random_producer_id(void) {
    uint64_t id = 0;
    FILE *f = fopen("/dev/urandom", "rb");
    if (!f || fread(&id, sizeof id, 1, f) != 1) die(1, "no /dev/urandom for a producer id");
    fclose(f);
    return (int64_t)(id >> 1);  /* 63 random bits: ids are >= 0 */
}

/* Sends one BATCH until it is acked; returns its base offset. */
static int64_t send_until_acked(const char *bootstrap, void **dealer, uint8_t *frame,
                                size_t length, int partition, int topic_created) {
    uint8_t reply[PRODUCE_REPLY_BYTES + 1100];
    for (int attempt = 1; attempt <= ATTEMPTS_MAX; attempt++) {
        int n = request(*dealer, frame, length, reply, sizeof reply);
        if (n < 0) {  /* no reply in time: resend the very same batch */
            fprintf(stderr, "device: no reply in %d ms, resending the batch (attempt %d)\n",
                    REQUEST_TIMEOUT_MS, attempt + 1);
            continue;
        }
        int code = error_code(reply);
        if (code == ERR_NONE && n == PRODUCE_REPLY_BYTES) {
            if (reply[32] < ACKS_FSYNC) die(1, "reply below the durability asked for");
            return (int64_t)get_le(reply + 16, 8);
        }
        /* A topic just created reaches the workers a moment after the supervisor's reply. */
        if (!retriable(code) && !(code == ERR_UNKNOWN_TOPIC_OR_PARTITION && topic_created)) {
            print_error(reply, n);
            exit(1);
        }
        if (code == ERR_NOT_OWNER) {  /* reconnect to the owner the metadata names now */
            char endpoint[256];
            const char *meta = metadata(bootstrap, MSG_METADATA, "");
            long workers;
            if (!json_int(json_get(meta, "worker_count"), &workers)) die(1, "bad metadata");
            worker_endpoint(meta, (int)(partition % workers), "router", endpoint, sizeof endpoint);
            zmq_close(*dealer);
            *dealer = dealer_to(endpoint);
        }
        sleep_ms(BACKOFF_MS);
    }
    die(3, "no ack after every retry: is the appliance up? (`ingest status`)");
    return -1;
}

static int cmd_send(const char *bootstrap, const char *topic, const char *device_id, long count) {
    int created;
    int partitions = partitions_of(bootstrap, topic, &created);
    int partition = partition_for_key(device_id, strlen(device_id), partitions);
    char endpoint[256];
    const char *meta = metadata(bootstrap, MSG_METADATA, "");
    long workers;
    if (!json_int(json_get(meta, "worker_count"), &workers) || workers <= 0) die(1, "bad metadata");
    worker_endpoint(meta, (int)(partition % workers), "router", endpoint, sizeof endpoint);
    void *dealer = dealer_to(endpoint);
    int64_t producer_id = random_producer_id();
    int32_t sequence = 0;  /* records this producer sent to the partition so far */
    for (long seq = 0; seq < count; seq += BATCH_RECORDS_MAX) {
        int records = count - seq < BATCH_RECORDS_MAX ? (int)(count - seq) : BATCH_RECORDS_MAX;
        uint8_t frame[FRAME_BYTES_MAX];
        size_t topic_bytes = strlen(topic);
        uint8_t *p = put_header(frame, MSG_BATCH, ACKS_FSYNC, 0);
        *p++ = (uint8_t)topic_bytes;
        p = put_le(p, 0, 3);                      /* reserved */
        p = put_le(p, (uint64_t)partition, 4);
        memcpy(p, topic, topic_bytes); p += topic_bytes;
        p += encode_record_batch(p, device_id, device_id, seq, records, producer_id, sequence,
                                 now_ms());
        int64_t base = send_until_acked(bootstrap, &dealer, frame, (size_t)(p - frame),
                                        partition, created);
        printf("acked %d readings: partition %d offsets %lld..%lld\n", records, partition,
               (long long)base, (long long)(base + records - 1));
        sequence += records;
    }
    zmq_close(dealer);
    return 0;
}

static int cmd_raw(const char *bootstrap, const char *topic, long count) {
    long raw_port;
    char endpoint[256], host[200];
    const char *meta = metadata(bootstrap, MSG_METADATA, "");
    if (!json_int(json_get(json_get(json_get(meta, "topics"), topic), "raw_port"), &raw_port) ||
        raw_port <= 0)
        die(1, "the topic has no raw_port: give it one in the appliance's [[topic]] config");
    /* The raw listener lives on the host the workers' endpoints name. */
    worker_endpoint(meta, 0, "pull", endpoint, sizeof endpoint);
    const char *colon = strrchr(endpoint, ':');
    if (!colon || (size_t)(colon - endpoint) >= sizeof host) die(1, "unreadable worker endpoint");
    memcpy(host, endpoint, (size_t)(colon - endpoint));
    host[colon - endpoint] = 0;
    snprintf(endpoint, sizeof endpoint, "%s:%ld", host, raw_port);
    void *push = zmq_socket(context, ZMQ_PUSH);
    int linger_ms = PUSH_LINGER_MS;
    zmq_setsockopt(push, ZMQ_LINGER, &linger_ms, sizeof linger_ms);
    if (zmq_connect(push, endpoint) != 0) die(1, "cannot connect to the raw listener");
    for (long seq = 0; seq < count; seq++) {
        char value[VALUE_BYTES_MAX];
        int n = reading(value, "raw", seq);
        if (zmq_send(push, value, (size_t)n, 0) < 0) die(3, zmq_strerror(zmq_errno()));
    }
    zmq_close(push);
    printf("sent %ld raw readings to %s\n", count, endpoint);
    return 0;
}

static long parse_count(const char *text) {
    char *end;
    long count = strtol(text, &end, 10);
    if (*end || count < 0) die(2, "COUNT must be a number >= 0");
    return count;
}

int main(int argc, char **argv) {
    const char *usage =
        "usage: device push BOOTSTRAP TOPIC DEVICE_ID COUNT\n"
        "       device send BOOTSTRAP TOPIC DEVICE_ID COUNT\n"
        "       device raw  BOOTSTRAP TOPIC COUNT";
    int status;
    context = zmq_ctx_new();
    if (argc == 6 && (!strcmp(argv[1], "push") || !strcmp(argv[1], "send"))) {
        if (strlen(argv[3]) > TOPIC_BYTES_MAX || !*argv[3]) die(2, "TOPIC must be 1..249 bytes");
        if (strlen(argv[4]) >= KEY_BYTES_MAX || !*argv[4]) die(2, "DEVICE_ID must be 1..63 bytes");
        long count = parse_count(argv[5]);
        status = argv[1][0] == 'p' ? cmd_push(argv[2], argv[3], argv[4], count)
                                   : cmd_send(argv[2], argv[3], argv[4], count);
    } else if (argc == 5 && !strcmp(argv[1], "raw")) {
        status = cmd_raw(argv[2], argv[3], parse_count(argv[4]));
    } else {
        die(2, usage);
        return 2;
    }
    zmq_ctx_term(context);
    return status;
}
