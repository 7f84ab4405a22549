/* memtest: every vCPU writes an address-derived pattern over its share of all free guest RAM,
 * then verifies the share another vCPU wrote, for arg passes (0 means 1). Each pass is framed
 * by NOP doorbell marks (2p at start, 2p+1 at end) so the host can time it. */
#include "spanvm.h"

static volatile u64 errors, first_bad = ~0UL, checked;
static struct barrier sync;

static u64 pattern(u64 addr, u64 pass) { return addr ^ (0x5a5a5a5a5a5a5a5aUL * (pass + 1)); }

static void share(const struct spanvm_range *r, u64 k, u64 parts, u64 *lo, u64 *hi) {
    u64 words = (r->end - r->start) / 8;
    *lo = r->start + words * k / parts * 8;
    *hi = r->start + words * (k + 1) / parts * 8;
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
            for (u64 a = lo; a < hi; a += 8) *(volatile u64 *)a = pattern(a, p);
        }
        barrier_wait(&sync, parts);
        u64 bad = 0, seen = 0;
        for (u32 r = 0; r < bi->nr_ranges; r++) {
            u64 lo, hi;
            share(&bi->heap[r], other, parts, &lo, &hi);
            for (u64 a = lo; a < hi; a += 8) {
                if (*(volatile u64 *)a != pattern(a, p)) {
                    if (!bad && a < first_bad) first_bad = a;
                    bad++;
                }
            }
            seen += hi - lo;
        }
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
