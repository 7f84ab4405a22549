/* The guest runtime shared by all payloads: console, exit, park, barrier, mem*. */
#include "spanvm.h"

void console_write(const char *s, u64 len) {
    while (len) {
        u64 chunk = len > 0xffff ? 0xffff : len;
        mmio_write(DB_WRITE, (chunk << 48) | (u64)s);
        s += chunk;
        len -= chunk;
    }
}

void print(const char *s) {
    u64 n = 0;
    while (s[n]) n++;
    console_write(s, n);
}

void print_u64(u64 v) {
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do { buf[--i] = (char)('0' + v % 10); v /= 10; } while (v);
    print(&buf[i]);
}

void print_hex(u64 v) {
    char buf[19];
    buf[0] = '0'; buf[1] = 'x';
    for (int i = 0; i < 16; i++) buf[2 + i] = "0123456789abcdef"[(v >> (60 - 4 * i)) & 15];
    buf[18] = 0;
    print(buf);
}

void vm_exit(u32 code) {
    for (;;) mmio_write(DB_EXIT, code);
}

void vcpu_park(void) {
    for (;;) mmio_write(DB_PARK, 0);
}

void payload_return(int code) {
    if (bootinfo->vcpu_id == 0) vm_exit((u32)code);
    vcpu_park();
}

void barrier_wait(struct barrier *b, u64 parties) {
    u64 gen = atomic_load(&b->generation);
    if (atomic_fetch_add(&b->arrived, 1) == parties - 1) {
        atomic_store(&b->arrived, 0);
        atomic_store(&b->generation, gen + 1);
    } else {
        while (atomic_load(&b->generation) == gen) cpu_relax();
    }
}

void *memset(void *dst, int c, u64 n) {
    u8 *d = dst;
    while (n--) *d++ = (u8)c;
    return dst;
}

void *memcpy(void *dst, const void *src, u64 n) {
    u8 *d = dst;
    const u8 *s = src;
    while (n--) *d++ = *s++;
    return dst;
}
