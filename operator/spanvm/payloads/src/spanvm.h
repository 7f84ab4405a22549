/* spanvm guest runtime: the boot-info page, the MMIO doorbell and small SMP helpers.
 * Payloads run at CPL3 in 64-bit mode set up by the monitor (identity-mapped, no OS). */
#ifndef SPANVM_H
#define SPANVM_H

typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned char u8;
typedef long s64;

#define SPANVM_BOOTINFO_MAGIC 0x49424d564e415053UL /* "SPANVMBI" */
#define SPANVM_MAX_RANGES 4

struct spanvm_range { u64 start, end; };

/* Written by the monitor, one page per vCPU; read-only to the guest.
 * Keep in sync with operator/spanvm/vmm/layout.py (BootInfo). */
struct spanvm_bootinfo {
    u64 magic;
    u32 vcpu_id;
    u32 vcpu_count;
    u64 ram_size;
    u64 mmio_base;
    u64 arg;
    u64 stack_top;
    u32 nr_ranges;
    u32 reserved;
    struct spanvm_range heap[SPANVM_MAX_RANGES];
    u64 self; /* this page's own address; the FS base points here too */
};

/* Doorbell registers (offsets from mmio_base); keep in sync with vmm/layout.py (Doorbell). */
#define DB_PUTC 0x00
#define DB_WRITE 0x08 /* value: (len << 48) | guest address */
#define DB_EXIT 0x10  /* value: exit code; stops the VM */
#define DB_PARK 0x18  /* this vCPU is done; the VM goes on */
#define DB_NOP 0x20   /* counts an exit, does nothing (benchmarks) */

/* Each vCPU's FS base is its own boot-info page (set by the monitor), so this is per vCPU. */
static inline const struct spanvm_bootinfo *current_bootinfo(void) {
    const struct spanvm_bootinfo *bi;
    __asm__("movq %%fs:%c1, %0" : "=r"(bi) : "i"(__builtin_offsetof(struct spanvm_bootinfo, self)));
    return bi;
}
#define bootinfo current_bootinfo()

static inline void mmio_write(u64 reg, u64 value) {
    *(volatile u64 *)(bootinfo->mmio_base + reg) = value;
}

void console_write(const char *s, u64 len);
void print(const char *s);
void print_u64(u64 v);
void print_hex(u64 v);
__attribute__((noreturn)) void vm_exit(u32 code);
__attribute__((noreturn)) void vcpu_park(void);

static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void compiler_barrier(void) { __asm__ volatile("" ::: "memory"); }
static inline u64 atomic_fetch_add(volatile u64 *p, u64 v) {
    __asm__ volatile("lock xaddq %0, %1" : "+r"(v), "+m"(*p) : : "memory");
    return v;
}
static inline u64 atomic_load(volatile u64 *p) { return *p; }
static inline void atomic_store(volatile u64 *p, u64 v) {
    __asm__ volatile("xchgq %0, %1" : "+r"(v), "+m"(*p) : : "memory");
}

/* A barrier for all vCPUs (sense-reversing, one use per round). */
struct barrier { volatile u64 arrived; volatile u64 generation; };
void barrier_wait(struct barrier *b, u64 parties);

/* A deterministic per-index value, also computed by the host (vmm/expected.py). */
static inline u64 mix64(u64 x) {
    x += 0x9e3779b97f4a7c15UL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9UL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebUL;
    return x ^ (x >> 31);
}

void *memset(void *dst, int c, u64 n);
void *memcpy(void *dst, const void *src, u64 n);

/* Every payload defines this; vCPU 0's return value is the VM's exit code,
 * other vCPUs park when it returns. */
int payload_main(const struct spanvm_bootinfo *bi);

#endif
