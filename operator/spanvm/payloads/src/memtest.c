/* memtest: every vCPU writes an address-derived pattern over its share of all free guest RAM,
 * then verifies the share another vCPU wrote, for arg passes (0 means 1). Each pass is framed
 * by NOP doorbell marks (2p at start, 2p+1 at end) so the host can time it. */
#include "spanvm.h"

static volatile u64 errors, first_bad = ~0UL, checked;
static struct barrier sync;

static u64 pattern(u64 addr, u64 pass) { return addr ^ (0x5a5a5a5a5a5a5a5aUL * (pass + 1)); }

typedef long long v2di __attribute__((vector_size(16)));

/* Write the pattern over [lo, hi) (16-byte aligned) with streaming stores: the data is not
 * read back before the other vCPUs verify it, so it need not pass through the cache. */
static void fill(u64 lo, u64 hi, u64 pass) {
    u64 k = 0x5a5a5a5a5a5a5a5aUL * (pass + 1);
    v2di value = {(long long)(lo ^ k), (long long)((lo + 8) ^ k)};
    v2di step = {16, 16}, key = {(long long)k, (long long)k};
    v2di addr = {(long long)lo, (long long)(lo + 8)};
    for (u64 a = lo; a < hi; a += 16) {
        value = addr ^ key;
        __builtin_ia32_movntdq((v2di *)a, value);
        addr += step;
    }
    __builtin_ia32_sfence();
}

#define CHUNK 4096
/* Mismatching words in [lo, hi); the first bad address goes to *first. OR-accumulates per
 * chunk (vectorised) and counts word by word only in a chunk that differs. */
static u64 verify(u64 lo, u64 hi, u64 pass, u64 *first) {
    u64 bad = 0;
    for (u64 c = lo; c < hi; c += CHUNK) {
        u64 end = c + CHUNK < hi ? c + CHUNK : hi, diff = 0;
        const u64 *w = (const u64 *)c;
        for (u64 i = 0; i < (end - c) / 8; i++) diff |= w[i] ^ pattern(c + 8 * i, pass);
        if (!diff) continue;
        for (u64 i = 0; i < (end - c) / 8; i++) {
            if (w[i] != pattern(c + 8 * i, pass)) {
                if (c + 8 * i < *first) *first = c + 8 * i;
                bad++;
            }
        }
    }
    return bad;
}

static void share(const struct spanvm_range *r, u64 k, u64 parts, u64 *lo, u64 *hi) {
    u64 words = (r->end - r->start) / 8;
    *lo = r->start + words * k / parts / 2 * 16;
    *hi = r->start + words * (k + 1) / parts / 2 * 16;
}

int payload_main(const struct spanvm_bootinfo *bi) {
    u64 passes = bi->arg ? bi->arg : 1, parts = bi->vcpu_count, me = bi->vcpu_id;
    u64 other = (me + 1) % parts;
    for (u64 p = 0; p < passes; p++) {
        barrier_wait(&sync, parts);
        if (me == 0) mmio_write(DB_NOP, 2 * p);
        for (u32 r = 0; r < bi->nr_ranges; r++) {
            u64 lo, hi;
            share(&bi->heap[r], me, parts, &lo, &hi);
            fill(lo, hi, p);
        }
        barrier_wait(&sync, parts);
        u64 bad = 0, seen = 0, first = ~0UL;
        for (u32 r = 0; r < bi->nr_ranges; r++) {
            u64 lo, hi;
            share(&bi->heap[r], other, parts, &lo, &hi);
            bad += verify(lo, hi, p, &first);
            seen += hi - lo;
        }
        if (bad && first < first_bad) first_bad = first;
        atomic_fetch_add(&errors, bad);
        atomic_fetch_add(&checked, seen);
        barrier_wait(&sync, parts);
        if (me == 0) mmio_write(DB_NOP, 2 * p + 1);
    }
    if (me != 0) return 0;
    print("memtest: passes=");
    print_u64(passes);
    print(" bytes=");
    print_u64(checked);
    print(" errors=");
    print_u64(errors);
    if (errors) {
        print(" first_bad=");
        print_hex(first_bad);
    }
    print("\n");
    return errors ? 1 : 0;
}
