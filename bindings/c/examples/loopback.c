/*
 * loopback.c: two Genie endpoints on loopback TCP, from C.
 *
 * The server exposes a region; the client writes into it with a notification, the server waits
 * for the notification and checks the bytes, then the client reads them back into its own
 * (registered in place) array and checks them.
 * A write past the end of the region fails with GENIE_ERR_OUT_OF_BOUNDS and a message.
 *
 * Build and run (scripts/test.sh does this):
 *   cargo build --release -p genie-c
 *   cc -O2 -Wall -Wextra -I bindings/c/include bindings/c/examples/loopback.c \
 *      target/release/libgenie.a -lpthread -ldl -lm -o /tmp/genie-loopback && /tmp/genie-loopback
 */
#include <genie.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define WAIT_MS 10000u
#define LEN 4096u

/* Exits with the call's status name and the library's message when a call fails. */
#define CHECK(call)                                                                          \
    do {                                                                                     \
        genie_status s_ = (call);                                                            \
        if (s_ != GENIE_OK) {                                                                \
            fprintf(stderr, "%s:%d: %s: %s (%s)\n", __FILE__, __LINE__, #call,                \
                    genie_status_name(s_), genie_last_error());                              \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)

int main(void) {
    genie_options opts;
    CHECK(genie_options_init(&opts));
    opts.backend = GENIE_BACKEND_TCP;
    opts.secret = "loopback-example";

    genie_endpoint *server, *client;
    CHECK(genie_endpoint_open(&opts, &server));
    CHECK(genie_endpoint_open(&opts, &client));
    char addr[64];
    CHECK(genie_endpoint_address(server, addr, sizeof addr));
    const char *reason;
    CHECK(genie_endpoint_backend(server, NULL, &reason));
    printf("server listening on %s (backend: %s)\n", addr, reason);

    /* The server's landing region; its descriptor travels as bytes (any side channel works). */
    genie_region *target;
    CHECK(genie_region_alloc(server, LEN, GENIE_ACCESS_READ_WRITE, 0, &target));
    genie_remote desc;
    CHECK(genie_region_descriptor(target, &desc));
    uint8_t wire[GENIE_DESCRIPTOR_LEN];
    CHECK(genie_remote_encode(&desc, wire));

    genie_connection *conn, *peer;
    CHECK(genie_connect(client, addr, &conn));
    CHECK(genie_accept(server, WAIT_MS, &peer));
    genie_remote remote;
    CHECK(genie_remote_decode(wire, sizeof wire, &remote));

    /* Fill the client's source region in place (zero-copy pointer to registered memory). */
    genie_region *src, *back;
    CHECK(genie_region_alloc(client, LEN, GENIE_ACCESS_LOCAL, 0, &src));
    static uint8_t mine[LEN]; /* the caller's own memory, registered in place for the read-back */
    CHECK(genie_region_register(client, mine, LEN, GENIE_ACCESS_LOCAL, &back));
    uint8_t *data;
    size_t len;
    CHECK(genie_region_data(src, &data, &len));
    for (size_t i = 0; i < len; i++) data[i] = (uint8_t)(i * 7 + 3);

    /* Write with a notification; the server learns the data landed. */
    genie_op *op;
    CHECK(genie_write_notify(conn, src, 0, &remote, 0, LEN, 42, &op));
    CHECK(genie_op_wait(op, WAIT_MS));
    CHECK(genie_op_free(op));
    uint32_t imm;
    CHECK(genie_recv_notification(peer, WAIT_MS, &imm));
    uint8_t landed[LEN];
    CHECK(genie_region_read(target, 0, landed, LEN));
    if (imm != 42 || memcmp(landed, data, LEN) != 0) {
        fprintf(stderr, "the write did not land as sent (notification %u)\n", imm);
        return 1;
    }
    printf("write with notification %u: %u bytes landed intact\n", imm, LEN);

    /* Read it back into another region. */
    CHECK(genie_read(conn, back, 0, &remote, 0, LEN, &op));
    CHECK(genie_op_wait(op, WAIT_MS));
    CHECK(genie_op_free(op));
    if (memcmp(mine, data, LEN) != 0) {
        fprintf(stderr, "the read-back differs\n");
        return 1;
    }
    printf("read back: %u bytes match\n", LEN);

    /* A typed error: out of the remote region's bounds; the connection stays usable. */
    CHECK(genie_write(conn, src, 0, &remote, LEN - 8, 64, &op));
    genie_status s = genie_op_wait(op, WAIT_MS);
    CHECK(genie_op_free(op));
    if (s != GENIE_ERR_OUT_OF_BOUNDS) {
        fprintf(stderr, "expected GENIE_ERR_OUT_OF_BOUNDS, got %s\n", genie_status_name(s));
        return 1;
    }
    printf("out-of-bounds write refused: %s: %s\n", genie_status_name(s), genie_last_error());

    CHECK(genie_region_free(back));
    CHECK(genie_region_free(src));
    CHECK(genie_connection_free(conn));
    CHECK(genie_connection_free(peer));
    CHECK(genie_region_free(target));
    CHECK(genie_endpoint_free(client));
    CHECK(genie_endpoint_free(server));
    printf("loopback: OK\n");
    return 0;
}
