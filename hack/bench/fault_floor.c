/* The remote page fault's floor in C: the fabric's system calls on the fabric's threads, with
 * no protocol logic (hack/bench/fault_floor.py builds, runs and explains it).
 *
 * A "toucher" thread stands in for a vCPU and reads one byte of each of N pages of a region
 * registered with userfaultfd (userfaultfd(2), ioctl_userfaultfd(2)). The time of one fault
 * is taken as fabric.py takes it: from the fault thread reading the event to the page
 * installed. Modes:
 *   local     the fault thread installs a zero page (UFFDIO_COPY);
 *   threads3  the fault thread sends a 24-byte request over loopback TCP to a home process,
 *             which write-protects its copy (UFFDIO_WRITEPROTECT) and answers with 24 bytes
 *             and the page; a reader thread receives it and installs it (the fabric's
 *             threads);
 *   threads2  the same, the fault thread reading its own grant (no reader thread).
 * Prints "MODE P50_US" per mode given on the command line. Exit 1 with a message on error,
 * also when the home does not connect or no fault comes for 5 s (never hangs).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define REQUEST 24

enum mode { LOCAL, THREADS3, THREADS2 };

static long pages;
static enum mode mode;
static char *region;
static int uffd, sock;
static double *samples, *asked_at;
static long sampled;

static void die(const char *what) {
    fprintf(stderr, "fault_floor: %s: %s\n", what, strerror(errno));
    exit(1);
}

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int recv_all(int fd, void *buf, size_t len) {
    for (size_t got = 0; got < len;) {
        ssize_t n = recv(fd, (char *)buf + got, len - got, 0);
        if (n <= 0) return -1;
        got += (size_t)n;
    }
    return 0;
}

static void send_all(int fd, const void *buf, size_t len) {
    for (size_t sent = 0; sent < len;) {
        ssize_t n = send(fd, (const char *)buf + sent, len - sent, 0);
        if (n < 0) die("send");
        sent += (size_t)n;
    }
}

static int register_region(char *start, size_t len, int wp) {
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) die("userfaultfd");
    struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_PAGEFAULT_FLAG_WP};
    if (ioctl(fd, UFFDIO_API, &api)) die("UFFDIO_API");
    struct uffdio_register reg = {
        .range = {(uint64_t)start, len},
        .mode = UFFDIO_REGISTER_MODE_MISSING | (wp ? UFFDIO_REGISTER_MODE_WP : 0),
    };
    if (ioctl(fd, UFFDIO_REGISTER, &reg)) die("UFFDIO_REGISTER");
    return fd;
}

static void copy_page(int fd, char *dst, const void *src) {
    struct uffdio_copy copy = {.dst = (uint64_t)dst, .src = (uint64_t)src, .len = PAGE};
    if (ioctl(fd, UFFDIO_COPY, &copy)) die("UFFDIO_COPY");
}

static char *map_pages(void) {
    char *m = mmap(NULL, (size_t)pages * PAGE, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) die("mmap");
    return m;
}

/* The home: every page present, each request answered by write-protect, copy, send. */
static void home(int port) {
    static const char zero[PAGE];
    static char out[REQUEST + PAGE];
    char *memory = map_pages();
    int fd = register_region(memory, (size_t)pages * PAGE, 1);
    for (long i = 0; i < pages; i++) copy_page(fd, memory + i * PAGE, zero);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (s < 0 || connect(s, (struct sockaddr *)&addr, sizeof addr)) die("connect");
    int one = 1;
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    uint64_t request[REQUEST / 8];
    while (recv_all(s, request, sizeof request) == 0) {
        char *page = memory + request[0] * PAGE;
        struct uffdio_writeprotect wp = {{(uint64_t)page, PAGE}, UFFDIO_WRITEPROTECT_MODE_WP};
        if (ioctl(fd, UFFDIO_WRITEPROTECT, &wp)) die("UFFDIO_WRITEPROTECT");
        memcpy(out, request, REQUEST);
        memcpy(out + REQUEST, page, PAGE);
        send_all(s, out, sizeof out);
    }
    exit(0);
}

static void receive_grant(void) {
    static char in[REQUEST + PAGE];
    if (recv_all(sock, in, sizeof in)) die("recv");
    uint64_t page;
    memcpy(&page, in, sizeof page);
    copy_page(uffd, region + page * PAGE, in + REQUEST);
    samples[sampled++] = now_us() - asked_at[page];
}

static void *reader(void *unused) {
    (void)unused;
    while (sampled < pages) receive_grant();
    return NULL;
}

static void *fault_loop(void *unused) {
    (void)unused;
    static const char zero[PAGE];
    struct uffd_msg msgs[16];
    for (long done = 0; done < pages;) {
        struct pollfd p = {.fd = uffd, .events = POLLIN};
        if (poll(&p, 1, 5000) <= 0) die("poll (no fault within 5 s)");
        double read_at = now_us();
        ssize_t n = read(uffd, msgs, sizeof msgs);
        if (n < 0 && errno == EAGAIN) continue;
        if (n < 0) die("read");
        for (long i = 0; i < n / (long)sizeof msgs[0]; i++, done++) {
            uint64_t page = (msgs[i].arg.pagefault.address - (uint64_t)region) / PAGE;
            if (mode == LOCAL) {
                copy_page(uffd, region + page * PAGE, zero);
                samples[sampled++] = now_us() - read_at;
                continue;
            }
            uint64_t request[REQUEST / 8] = {page};
            asked_at[page] = read_at;
            send_all(sock, request, sizeof request);
            if (mode == THREADS2) receive_grant();
        }
    }
    return NULL;
}

static void *toucher(void *unused) {
    (void)unused;
    for (long i = 0; i < pages; i++) (void)*(volatile char *)(region + i * PAGE);
    return NULL;
}

static int by_value(const void *a, const void *b) {
    double d = *(const double *)a - *(const double *)b;
    return (d > 0) - (d < 0);
}

static double run(enum mode m) {
    mode = m;
    sampled = 0;
    region = map_pages();
    uffd = register_region(region, (size_t)pages * PAGE, 0);
    pid_t child = 0;
    if (m != LOCAL) {
        int listener = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in addr = {.sin_family = AF_INET};
        addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        socklen_t len = sizeof addr;
        if (listener < 0 || bind(listener, (struct sockaddr *)&addr, sizeof addr) ||
            listen(listener, 1) || getsockname(listener, (struct sockaddr *)&addr, &len))
            die("listen");
        child = fork();
        if (child < 0) die("fork");
        if (child == 0) {
            close(listener);
            home(ntohs(addr.sin_port));
        }
        struct pollfd p = {.fd = listener, .events = POLLIN};
        if (poll(&p, 1, 10000) <= 0) die("accept (the home did not connect within 10 s)");
        sock = accept(listener, NULL, NULL);
        if (sock < 0) die("accept");
        int one = 1;
        setsockopt(sock, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        close(listener);
    }
    pthread_t threads[3];
    int count = m == THREADS3 ? 3 : 2;
    void *(*bodies[3])(void *) = {fault_loop, toucher, reader};
    for (int i = 0; i < count; i++) pthread_create(&threads[i], NULL, bodies[i], NULL);
    for (int i = 0; i < count; i++) pthread_join(threads[i], NULL);
    if (m != LOCAL) {
        shutdown(sock, SHUT_RDWR);
        close(sock);
        waitpid(child, NULL, 0);
    }
    close(uffd);
    munmap(region, (size_t)pages * PAGE);
    qsort(samples, (size_t)sampled, sizeof *samples, by_value);
    return samples[sampled / 2];
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: fault_floor PAGES MODE... (local, threads3, threads2)\n");
        return 1;
    }
    pages = atol(argv[1]);
    if (pages <= 0) {
        fprintf(stderr, "fault_floor: PAGES must be a positive number, not %s\n", argv[1]);
        return 1;
    }
    samples = calloc((size_t)pages, sizeof *samples);
    asked_at = calloc((size_t)pages, sizeof *asked_at);
    if (!samples || !asked_at) die("calloc");
    for (int i = 2; i < argc; i++) {
        enum mode m;
        if (!strcmp(argv[i], "local")) m = LOCAL;
        else if (!strcmp(argv[i], "threads3")) m = THREADS3;
        else if (!strcmp(argv[i], "threads2")) m = THREADS2;
        else {
            fprintf(stderr, "fault_floor: unknown mode %s (local, threads3, threads2)\n", argv[i]);
            return 1;
        }
        printf("%s %.1f\n", argv[i], run(m));
        fflush(stdout);
    }
    return 0;
}
