/* latwrite: a steady writer for bench/archive.sh. Writes BS-byte blocks of pseudo-random data
 * at RATE writes per second (a fixed schedule: a late write does not make the next one come
 * sooner), cycling over the first 64 MiB of FILE, with an fdatasync after every FSYNC_EVERY
 * writes, until SECONDS passed or STOPFILE exists. One op = one write, plus its fdatasync when
 * one is due; its latency is measured from the call to the return.
 *
 *   latwrite FILE SECONDS RATE BS FSYNC_EVERY [STOPFILE]
 *
 * Output: "key value" lines: ops, p50_us, p99_us, p999_us, max_us, seconds.
 * Build: cc -O2 -o latwrite latwrite.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define REGION (64ull << 20)

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void die(const char *what)
{
    fprintf(stderr, "latwrite: %s: %s\n", what, strerror(errno));
    exit(1);
}

int main(int argc, char **argv)
{
    if (argc < 6 || argc > 7) {
        fprintf(stderr, "usage: latwrite FILE SECONDS RATE BS FSYNC_EVERY [STOPFILE]\n");
        return 2;
    }
    const char *path = argv[1];
    double seconds = atof(argv[2]), rate = atof(argv[3]);
    size_t bs = (size_t)atol(argv[4]);
    long every = atol(argv[5]);
    const char *stop = argc == 7 ? argv[6] : NULL;
    if (seconds <= 0 || rate <= 0 || bs == 0 || bs > REGION || every <= 0) {
        fprintf(stderr, "latwrite: bad arguments\n");
        return 2;
    }
    unsigned char *buf = malloc(bs);
    if (!buf)
        die("malloc");
    uint64_t x = 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i + 8 <= bs; i += 8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        memcpy(buf + i, &x, 8);
    }
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        die("open");
    size_t cap = (size_t)(seconds * rate) + 16, n = 0;
    double *lat = malloc(cap * sizeof(double));
    if (!lat)
        die("malloc");
    double t0 = now(), next = t0;
    uint64_t off = 0;
    while (n < cap) {
        double t = now();
        if (t - t0 >= seconds || (stop && access(stop, F_OK) == 0))
            break;
        if (t < next) {
            struct timespec ts = {0, (long)((next - t) * 1e9)};
            nanosleep(&ts, NULL);
        }
        double s = now();
        size_t done = 0;
        while (done < bs) {
            ssize_t w = pwrite(fd, buf + done, bs - done, (off_t)(off + done));
            if (w < 0) {
                if (errno == EINTR)
                    continue;
                die("write");
            }
            done += (size_t)w;
        }
        if ((long)((n + 1) % (size_t)every) == 0 && fdatasync(fd) < 0)
            die("fdatasync");
        lat[n++] = now() - s;
        off = (off + bs) % (REGION - REGION % bs);
        next += 1.0 / rate;
    }
    double total = now() - t0;
    if (close(fd) < 0)
        die("close");
    if (n == 0) {
        fprintf(stderr, "latwrite: no operation ran\n");
        return 1;
    }
    qsort(lat, n, sizeof(double), cmp);
    printf("ops %zu\np50_us %.0f\np99_us %.0f\np999_us %.0f\nmax_us %.0f\nseconds %.2f\n", n,
           lat[n / 2] * 1e6, lat[(size_t)(n * 0.99)] * 1e6, lat[(size_t)(n * 0.999)] * 1e6,
           lat[n - 1] * 1e6, total);
    return 0;
}
