/*
 * Two engines' worth of libtandem_kv, one per process, through the C header
 * only. Each region of each pool is its own malloc (as vLLM gives every layer
 * its own tensor).
 *
 *   kv_pair serve <backend>            prefill side: fill its pool, hold blocks
 *                                      3,4,5,9 for "req-1", print its endpoint,
 *                                      wait until the puller's notification
 *                                      releases them, print "released 4"
 *   kv_pair pull <backend> <host:port> decode side: READ those blocks into its
 *                                      0,1,2,7 with notify "req-1:1", check
 *                                      every byte, print "pulled <bytes>"
 *   kv_pair errors                     argument and state errors, no peer
 *
 * Exit status 0 when everything held; the message says what did not.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tandem_kv.h"

#define LAYERS 3
#define REGIONS (LAYERS * 2)
#define BLOCK_SIZE 4
#define KV_HEADS 2
#define HEAD_DIM 8
#define DTYPE_BYTES 2
#define BLOCK_LEN (BLOCK_SIZE * KV_HEADS * HEAD_DIM * DTYPE_BYTES)

static const uint32_t REMOTE[] = {3, 4, 5, 9};
static const uint32_t LOCAL[] = {0, 1, 2, 7};

static int fail(const char *what, TandemKvStatus s) {
    fprintf(stderr, "%s: status %d: %s\n", what, (int)s, tandem_kv_last_error());
    return 1;
}

static unsigned char pattern(int region, uint32_t block, size_t i) {
    return (unsigned char)(region * 131 + block * 31 + i * 7 + 5);
}

static TandemKvAgent *start(const char *backend, uint32_t num_blocks, unsigned char **regions) {
    char config[256];
    snprintf(config, sizeof config,
             "{\"engine_id\": \"c-test\", \"backend\": \"%s\", \"hold_timeout_s\": 30}", backend);
    TandemKvAgent *agent = NULL;
    TandemKvStatus s = tandem_kv_agent_create(config, &agent);
    if (s != TANDEM_KV_STATUS_OK) {
        fail("create", s);
        return NULL;
    }
    uint64_t bases[REGIONS];
    for (int r = 0; r < REGIONS; r++) {
        regions[r] = calloc(num_blocks, BLOCK_LEN);
        bases[r] = (uint64_t)(uintptr_t)regions[r];
    }
    char layout[256];
    snprintf(layout, sizeof layout,
             "{\"layers\": %d, \"kv_heads\": %d, \"head_dim\": %d, \"dtype\": \"bf16\", "
             "\"block_size\": %d, \"num_blocks\": %u}",
             LAYERS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, num_blocks);
    s = tandem_kv_register_memory(agent, layout, bases, REGIONS);
    if (s != TANDEM_KV_STATUS_OK) {
        fail("register", s);
        tandem_kv_agent_destroy(agent);
        return NULL;
    }
    return agent;
}

static int serve(const char *backend) {
    unsigned char *regions[REGIONS];
    TandemKvAgent *agent = start(backend, 16, regions);
    if (!agent) return 1;
    for (int r = 0; r < REGIONS; r++)
        for (uint32_t b = 0; b < 16; b++)
            for (size_t i = 0; i < BLOCK_LEN; i++) regions[r][b * BLOCK_LEN + i] = pattern(r, b, i);
    TandemKvStatus s = tandem_kv_hold(agent, "req-1", REMOTE, 4);
    if (s != TANDEM_KV_STATUS_OK) return fail("hold", s);
    size_t need = 0;
    s = tandem_kv_metadata(agent, NULL, 0, &need);
    if (s != TANDEM_KV_STATUS_BUFFER_TOO_SMALL || need < 2) return fail("metadata size", s);
    char *md = malloc(need);
    s = tandem_kv_metadata(agent, md, need, NULL);
    if (s != TANDEM_KV_STATUS_OK) return fail("metadata", s);
    const char *port = strstr(md, "\"port\":");
    if (!port) return fail("metadata has no port", s);
    printf("endpoint 127.0.0.1:%d\n", atoi(port + 7));
    fflush(stdout);
    char buf[4096];
    for (int i = 0; i < 3000; i++) { /* up to 30 s */
        s = tandem_kv_drain_released(agent, buf, sizeof buf, NULL);
        if (s != TANDEM_KV_STATUS_OK) return fail("drain", s);
        if (strstr(buf, "\"req-1\"")) {
            if (!strstr(buf, "\"blocks\":[3,4,5,9]") || !strstr(buf, "\"notification\"")) {
                fprintf(stderr, "unexpected release: %s\n", buf);
                return 1;
            }
            printf("released 4\n");
            fflush(stdout);
            tandem_kv_agent_destroy(agent);
            for (int r = 0; r < REGIONS; r++) free(regions[r]);
            return 0;
        }
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    fprintf(stderr, "no release within 30 s\n");
    return 1;
}

static int pull(const char *backend, const char *peer) {
    unsigned char *regions[REGIONS];
    TandemKvAgent *agent = start(backend, 8, regions);
    if (!agent) return 1;
    TandemKvTransferSpec spec = {
        .op = TANDEM_KV_OP_READ,
        .request_id = "decode-req-1",
        .peer = peer,
        .local_blocks = LOCAL,
        .num_local_blocks = 4,
        .remote_blocks = REMOTE,
        .num_remote_blocks = 4,
        .notify_request_id = "req-1",
        .notify_tp_size = 1,
        .timeout_ms = 20000,
    };
    uint64_t handle = 0;
    TandemKvStatus s = tandem_kv_transfer_start(agent, &spec, &handle);
    if (s != TANDEM_KV_STATUS_OK) return fail("transfer start", s);
    TandemKvTransferResult res;
    memset(&res, 0, sizeof res);
    s = tandem_kv_transfer_wait(agent, handle, 30000, &res);
    if (s != TANDEM_KV_STATUS_OK) return fail("transfer wait", s);
    if (res.bytes != (uint64_t)4 * BLOCK_LEN * REGIONS) {
        fprintf(stderr, "moved %llu bytes\n", (unsigned long long)res.bytes);
        return 1;
    }
    /* The handle is gone once reported. */
    s = tandem_kv_transfer_poll(agent, handle, NULL);
    if (s != TANDEM_KV_STATUS_NOT_FOUND) return fail("poll after done", s);
    for (int r = 0; r < REGIONS; r++)
        for (int k = 0; k < 4; k++)
            for (size_t i = 0; i < BLOCK_LEN; i++) {
                unsigned char got = regions[r][LOCAL[k] * BLOCK_LEN + i];
                if (got != pattern(r, REMOTE[k], i)) {
                    fprintf(stderr, "region %d block %u byte %zu: %u, want %u\n", r, LOCAL[k], i,
                            got, pattern(r, REMOTE[k], i));
                    return 1;
                }
            }
    /* Blocks that were not pulled are untouched. */
    for (int r = 0; r < REGIONS; r++)
        for (size_t i = 0; i < BLOCK_LEN; i++)
            if (regions[r][3 * BLOCK_LEN + i] != 0) {
                fprintf(stderr, "region %d block 3 was written\n", r);
                return 1;
            }
    /* Out-of-range block ids are the transfer's error, not a crash. */
    uint32_t bad_remote[] = {99};
    uint32_t one_local[] = {0};
    spec.remote_blocks = bad_remote;
    spec.local_blocks = one_local;
    spec.num_local_blocks = spec.num_remote_blocks = 1;
    spec.notify_request_id = NULL;
    s = tandem_kv_transfer_start(agent, &spec, &handle);
    if (s != TANDEM_KV_STATUS_OK) return fail("bad transfer start", s);
    s = tandem_kv_transfer_wait(agent, handle, 30000, &res);
    if (s >= 0) {
        fprintf(stderr, "a transfer of block 99 of 16 succeeded\n");
        return 1;
    }
    if (strstr(tandem_kv_last_error(), "99") == NULL) return fail("bad block message", s);
    printf("pulled %llu\n", (unsigned long long)(4 * BLOCK_LEN * REGIONS));
    tandem_kv_agent_destroy(agent);
    for (int r = 0; r < REGIONS; r++) free(regions[r]);
    return 0;
}

static int errors(void) {
    TandemKvAgent *agent = NULL;
    if (tandem_kv_agent_create("{\"backend\": \"tcp\"}", &agent) != TANDEM_KV_STATUS_INVALID_ARGUMENT ||
        agent != NULL || strstr(tandem_kv_last_error(), "engine_id") == NULL)
        return fail("config without engine_id", 0);
    if (tandem_kv_agent_create("{\"engine_id\": \"e\", \"bogus\": 1}", &agent) !=
        TANDEM_KV_STATUS_INVALID_ARGUMENT)
        return fail("unknown config key", 0);
    if (tandem_kv_agent_create(NULL, &agent) != TANDEM_KV_STATUS_INVALID_ARGUMENT)
        return fail("null config", 0);
    if (tandem_kv_agent_create("{\"engine_id\": \"e\", \"backend\": \"tcp\"}", &agent) !=
        TANDEM_KV_STATUS_OK)
        return fail("create", 0);
    char md[512];
    if (tandem_kv_metadata(agent, md, sizeof md, NULL) != TANDEM_KV_STATUS_STATE)
        return fail("metadata before register", 0);
    uint32_t blocks[] = {1};
    if (tandem_kv_hold(agent, "r", blocks, 1) != TANDEM_KV_STATUS_STATE)
        return fail("hold before register", 0);
    uint64_t bases[REGIONS] = {0};
    const char *layout = "{\"layers\": 3, \"kv_heads\": 2, \"head_dim\": 8, \"block_size\": 4, \"num_blocks\": 4}";
    if (tandem_kv_register_memory(agent, layout, bases, 2) != TANDEM_KV_STATUS_INVALID_ARGUMENT ||
        strstr(tandem_kv_last_error(), "6 regions") == NULL)
        return fail("wrong region count", 0);
    if (tandem_kv_register_memory(agent, layout, NULL, REGIONS) != TANDEM_KV_STATUS_INVALID_ARGUMENT)
        return fail("null bases", 0);
    if (tandem_kv_register_memory(agent, layout, bases, REGIONS) != TANDEM_KV_STATUS_INVALID_ARGUMENT)
        return fail("null base addresses", 0);
    unsigned char *mem = calloc(REGIONS, 4 * BLOCK_LEN);
    for (int r = 0; r < REGIONS; r++) bases[r] = (uint64_t)(uintptr_t)(mem + (size_t)r * 4 * BLOCK_LEN);
    if (tandem_kv_register_memory(agent, layout, bases, REGIONS) != TANDEM_KV_STATUS_OK)
        return fail("register", 0);
    if (tandem_kv_register_memory(agent, layout, bases, REGIONS) != TANDEM_KV_STATUS_STATE)
        return fail("register twice", 0);
    uint32_t out_of_range[] = {4};
    if (tandem_kv_hold(agent, "r", out_of_range, 1) != TANDEM_KV_STATUS_INVALID_ARGUMENT)
        return fail("hold out of range", 0);
    size_t n = 0;
    if (tandem_kv_hold(agent, "r", blocks, 1) != TANDEM_KV_STATUS_OK ||
        tandem_kv_release(agent, "r", &n) != TANDEM_KV_STATUS_OK || n != 1)
        return fail("hold and release", 0);
    if (tandem_kv_release(agent, "r", &n) != TANDEM_KV_STATUS_NOT_FOUND)
        return fail("release twice", 0);
    char tiny[4];
    size_t need = 0;
    if (tandem_kv_drain_released(agent, tiny, sizeof tiny, &need) != TANDEM_KV_STATUS_BUFFER_TOO_SMALL ||
        need <= sizeof tiny)
        return fail("drain into a small buffer", 0);
    char big[512];
    if (tandem_kv_drain_released(agent, big, sizeof big, NULL) != TANDEM_KV_STATUS_OK ||
        strstr(big, "\"reason\":\"request\"") == NULL)
        return fail("drain", 0);
    if (tandem_kv_transfer_poll(agent, 12345, NULL) != TANDEM_KV_STATUS_NOT_FOUND)
        return fail("unknown handle", 0);
    TandemKvTransferSpec spec = {.op = TANDEM_KV_OP_READ, .request_id = "x", .peer = "127.0.0.1:1",
                                 .local_blocks = blocks, .num_local_blocks = 1,
                                 .remote_blocks = NULL, .num_remote_blocks = 1};
    uint64_t handle;
    if (tandem_kv_transfer_start(agent, &spec, &handle) != TANDEM_KV_STATUS_INVALID_ARGUMENT)
        return fail("null remote blocks", 0);
    /* A peer that is not there: the transfer's error, within its deadline. */
    spec.remote_blocks = blocks;
    spec.timeout_ms = 3000;
    if (tandem_kv_transfer_start(agent, &spec, &handle) != TANDEM_KV_STATUS_OK)
        return fail("start to a dead peer", 0);
    TandemKvStatus s = tandem_kv_transfer_wait(agent, handle, 20000, NULL);
    if (s >= 0) return fail("a transfer from a dead peer succeeded", s);
    tandem_kv_agent_destroy(agent);
    tandem_kv_agent_destroy(NULL);
    free(mem);
    if (strlen(tandem_kv_version()) == 0) return fail("version", 0);
    printf("errors ok\n");
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 3 && strcmp(argv[1], "serve") == 0) return serve(argv[2]);
    if (argc >= 4 && strcmp(argv[1], "pull") == 0) return pull(argv[2], argv[3]);
    if (argc >= 2 && strcmp(argv[1], "errors") == 0) return errors();
    fprintf(stderr, "usage: kv_pair serve <backend> | pull <backend> <host:port> | errors\n");
    return 2;
}
