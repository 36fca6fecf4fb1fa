/* fsbench: the tiny, low-overhead workload driver used by bench/foundation.sh, so that every
 * target (native ext4, kernel overlayfs, spinfs) is measured by the same code and the figures
 * show the filesystem, not an interpreter.
 *
 *   fsbench seqwrite FILE MIB   write MIB MiB in 1 MiB writes, fsync, close; prints MB/s
 *   fsbench seqwrite-unique FILE MIB   the same, every MiB made unique (its first 8 bytes
 *                               carry its index), so no chunk of the file deduplicates
 *   fsbench seqwrite-rdwr FILE MIB   as seqwrite, through an O_RDWR descriptor
 *   fsbench seqread FILE        read FILE to EOF in 1 MiB reads; prints MB/s
 *   fsbench seqread-rdwr FILE   as seqread, through an O_RDWR descriptor
 *   fsbench randread-rdwr FILE SECS   4 KiB preads at pseudo-random 4 KiB-aligned offsets of
 *                               FILE through an O_RDWR descriptor for SECS s; prints IOPS
 *   fsbench meta DIR N          create (open O_CREAT|O_EXCL + close), stat, unlink N files;
 *                               prints ops/s with one op per create, stat and unlink (3N ops)
 *
 * Output: "key value" lines. MB = 10^6 bytes. Exit status non-zero on any failed syscall.
 * Build: cc -O2 -o fsbench fsbench.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (1 << 20)
/* 64 MiB of pseudo-random data written cyclically: incompressible within a chunk and not
 * trivially zero, so no target can take a sparse-file or zero-detection shortcut. Every 4 KiB
 * block written is stamped with its position in the file, so no two blocks are equal and
 * deduplication (spinfs seals dedup identical chunks) cannot shrink what is stored either. */
#define PATTERN (64u << 20)

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what, const char *path)
{
    fprintf(stderr, "fsbench: %s %s: %s\n", what, path ? path : "", strerror(errno));
    exit(1);
}

static int seqwrite(const char *path, long mib, int unique, int accmode)
{
    unsigned char *buf = malloc(PATTERN);
    if (!buf)
        die("malloc", NULL);
    uint64_t x = 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i < PATTERN; i += 8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        memcpy(buf + i, &x, 8);
    }
    double t0 = now();
    int fd = open(path, accmode | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        die("open", path);
    size_t off = 0;
    for (long i = 0; i < mib; i++) {
        for (size_t b = 0; b < CHUNK; b += 4096) {
            uint64_t at = (uint64_t)i * CHUNK + b;
            memcpy(buf + off + b, &at, 8);
        }
        size_t done = 0;
        if (unique) {
            uint64_t tag = (uint64_t)i ^ 0x5350494E46535543ull;
            memcpy(buf + off, &tag, 8);
        }
        while (done < CHUNK) {
            ssize_t n = write(fd, buf + off + done, CHUNK - done);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                die("write", path);
            }
            done += (size_t)n;
        }
        off = (off + CHUNK) % PATTERN;
    }
    if (fsync(fd) < 0)
        die("fsync", path);
    if (close(fd) < 0)
        die("close", path);
    double dt = now() - t0;
    printf("bytes %lld\nseconds %.4f\nMBps %.1f\n", (long long)mib * CHUNK, dt,
           (double)mib * CHUNK / dt / 1e6);
    free(buf);
    return 0;
}

static int seqread(const char *path, int accmode)
{
    unsigned char *buf = malloc(CHUNK);
    if (!buf)
        die("malloc", NULL);
    double t0 = now();
    int fd = open(path, accmode);
    if (fd < 0)
        die("open", path);
    long long total = 0;
    for (;;) {
        ssize_t n = read(fd, buf, CHUNK);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("read", path);
        }
        if (n == 0)
            break;
        total += n;
    }
    close(fd);
    double dt = now() - t0;
    printf("bytes %lld\nseconds %.4f\nMBps %.1f\n", total, dt, (double)total / dt / 1e6);
    free(buf);
    return 0;
}

static int randread(const char *path, int accmode, double secs)
{
    static unsigned char buf[4096];
    int fd = open(path, accmode);
    if (fd < 0)
        die("open", path);
    struct stat st;
    if (fstat(fd, &st) < 0)
        die("fstat", path);
    uint64_t blocks = (uint64_t)st.st_size / 4096;
    if (blocks == 0) {
        fprintf(stderr, "fsbench: %s: smaller than 4 KiB\n", path);
        return 1;
    }
    uint64_t x = 0x2545F4914F6CDD1Dull, ops = 0;
    double t0 = now(), t = t0;
    while (t - t0 < secs) {
        for (int i = 0; i < 256; i++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if (pread(fd, buf, 4096, (off_t)((x % blocks) * 4096)) != 4096)
                die("pread", path);
        }
        ops += 256;
        t = now();
    }
    close(fd);
    printf("ops %llu\nseconds %.4f\niops %.0f\n", (unsigned long long)ops, t - t0,
           (double)ops / (t - t0));
    return 0;
}

static int meta(const char *dir, long n)
{
    char path[4096];
    struct stat st;
    double t0 = now();
    for (long i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/f%07ld", dir, i);
        int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0644);
        if (fd < 0)
            die("create", path);
        if (close(fd) < 0)
            die("close", path);
    }
    double t1 = now();
    for (long i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/f%07ld", dir, i);
        if (stat(path, &st) < 0)
            die("stat", path);
        if (!S_ISREG(st.st_mode) || st.st_size != 0) {
            fprintf(stderr, "fsbench: %s: unexpected mode/size\n", path);
            return 1;
        }
    }
    double t2 = now();
    for (long i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/f%07ld", dir, i);
        if (unlink(path) < 0)
            die("unlink", path);
    }
    double t3 = now();
    printf("files %ld\ncreate_ops %.0f\nstat_ops %.0f\nunlink_ops %.0f\nseconds %.4f\nops %.0f\n",
           n, n / (t1 - t0), n / (t2 - t1), n / (t3 - t2), t3 - t0, 3.0 * n / (t3 - t0));
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 4 && strcmp(argv[1], "seqwrite") == 0)
        return seqwrite(argv[2], atol(argv[3]), 0, O_WRONLY);
    if (argc == 4 && strcmp(argv[1], "seqwrite-unique") == 0)
        return seqwrite(argv[2], atol(argv[3]), 1, O_WRONLY);
    if (argc == 4 && strcmp(argv[1], "seqwrite-rdwr") == 0)
        return seqwrite(argv[2], atol(argv[3]), 0, O_RDWR);
    if (argc == 3 && strcmp(argv[1], "seqread") == 0)
        return seqread(argv[2], O_RDONLY);
    if (argc == 3 && strcmp(argv[1], "seqread-rdwr") == 0)
        return seqread(argv[2], O_RDWR);
    if (argc == 4 && strcmp(argv[1], "randread-rdwr") == 0)
        return randread(argv[2], O_RDWR, atof(argv[3]));
    if (argc == 4 && strcmp(argv[1], "meta") == 0)
        return meta(argv[2], atol(argv[3]));
    fprintf(stderr, "usage: fsbench seqwrite[-unique|-rdwr] FILE MIB | seqread[-rdwr] FILE |"
                    " randread-rdwr FILE SECS | meta DIR N\n");
    return 2;
}
