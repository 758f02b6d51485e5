/*
 * perf.c: the transport's cost from C, measured as `genie-perf` measures it from Rust.
 *
 * Loopback TCP, both endpoints in this process, busy polling. Prints one line:
 *   c write8_median_us=<t> bw64k_mb_s=<b>
 * write8: median post -> completion of an 8-byte write, one at a time (genie_write +
 * genie_op_wait + genie_op_free, timed with CLOCK_MONOTONIC around them); bw64k: 64 KiB writes,
 * up to 128 in flight, posted as batches of 32 with one handle each (genie_post_batch).
 *
 * Usage: perf [latency_iterations] [bandwidth_iterations]  (scripts/bench-bindings.sh builds it)
 */
#include <genie.h>

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define WAIT_MS 30000u
#define SIZE 65536u
#define WINDOW 128u
#define PER 32u

#define CHECK(call)                                                                          \
    do {                                                                                     \
        genie_status s_ = (call);                                                            \
        if (s_ != GENIE_OK) {                                                                \
            fprintf(stderr, "%s: %s (%s)\n", #call, genie_status_name(s_), genie_last_error()); \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    size_t n_lat = argc > 1 ? strtoul(argv[1], NULL, 10) : 20000;
    size_t n_bw = argc > 2 ? strtoul(argv[2], NULL, 10) : 4096;
    if (n_lat == 0 || n_bw == 0) return 2;

    genie_options o;
    CHECK(genie_options_init(&o));
    o.backend = GENIE_BACKEND_TCP;
    o.busy_poll = 1;
    genie_endpoint *server, *client;
    CHECK(genie_endpoint_open(&o, &server));
    CHECK(genie_endpoint_open(&o, &client));
    char addr[64];
    CHECK(genie_endpoint_address(server, addr, sizeof addr));
    genie_region *target, *local;
    CHECK(genie_region_alloc(server, SIZE * WINDOW, GENIE_ACCESS_READ_WRITE, 0, &target));
    CHECK(genie_region_alloc(client, SIZE * WINDOW, GENIE_ACCESS_LOCAL, 0, &local));
    genie_remote remote;
    CHECK(genie_region_descriptor(target, &remote));
    genie_connection *conn, *peer;
    CHECK(genie_connect(client, addr, &conn));
    CHECK(genie_accept(server, WAIT_MS, &peer));

    size_t warm = n_lat / 10 < 1 ? 1 : (n_lat / 10 > 100 ? 100 : n_lat / 10);
    uint64_t *times = malloc(n_lat * sizeof *times);
    if (!times) return 1;
    for (size_t i = 0; i < n_lat + warm; i++) {
        uint64_t t0 = now_ns();
        genie_op *op;
        CHECK(genie_write(conn, local, 0, &remote, 0, 8, &op));
        CHECK(genie_op_wait(op, WAIT_MS));
        genie_op_free(op);
        uint64_t t1 = now_ns();
        if (i >= warm) times[i - warm] = t1 - t0;
    }
    qsort(times, n_lat, sizeof *times, cmp_u64);
    double lat_us = (double)times[(size_t)((double)(n_lat - 1) * 0.5 + 0.5)] / 1e3;
    free(times);

    /* Batches of PER, at most WINDOW transfers in flight; transfer j uses slot j % WINDOW. */
    genie_batch *flying[WINDOW / PER + 1];
    size_t lens[WINDOW / PER + 1], head = 0, count = 0, inflight = 0, i = 0;
    const size_t ring = WINDOW / PER + 1;
    genie_transfer ts[PER];
    uint64_t t0 = now_ns();
    while (i < n_bw) {
        size_t b = n_bw - i < PER ? n_bw - i : PER;
        while (inflight + b > WINDOW && count > 0) {
            CHECK(genie_batch_wait(flying[head], WAIT_MS));
            genie_batch_free(flying[head]);
            inflight -= lens[head];
            head = (head + 1) % ring;
            count--;
        }
        for (size_t k = 0; k < b; k++) {
            uint64_t off = (uint64_t)((i + k) % WINDOW) * SIZE;
            ts[k] = (genie_transfer){GENIE_TRANSFER_WRITE, 0, off, off, SIZE};
        }
        size_t slot = (head + count) % ring;
        CHECK(genie_post_batch(conn, local, &remote, ts, b, &flying[slot]));
        lens[slot] = b;
        count++;
        inflight += b;
        i += b;
    }
    while (count > 0) {
        CHECK(genie_batch_wait(flying[head], WAIT_MS));
        genie_batch_free(flying[head]);
        head = (head + 1) % ring;
        count--;
    }
    double secs = (double)(now_ns() - t0) / 1e9;
    printf("c write8_median_us=%.3f bw64k_mb_s=%.1f\n", lat_us, (double)SIZE * (double)n_bw / secs / 1e6);

    genie_connection_free(conn);
    genie_connection_free(peer);
    genie_region_free(local);
    genie_region_free(target);
    genie_endpoint_free(client);
    genie_endpoint_free(server);
    return 0;
}
