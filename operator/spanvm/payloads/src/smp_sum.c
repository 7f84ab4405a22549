/* smp-sum: the vCPUs fill an array of arg words (a[i] = mix64(i)), then each sums the slice
 * another vCPU filled, and the partial sums are combined. vCPU 0 prints the sum (mod 2^64);
 * the host computes the same sum to check it. */
#include "spanvm.h"

static volatile u64 total;
static struct barrier filled, summed;
static volatile u64 too_big;

static u64 slice_start(u64 n, u64 k, u64 parts) { return n * k / parts; }

int payload_main(const struct spanvm_bootinfo *bi) {
    u64 n = bi->arg, parts = bi->vcpu_count, me = bi->vcpu_id;
    u64 *a = (u64 *)bi->heap[0].start;
    if (n * sizeof(u64) > bi->heap[0].end - bi->heap[0].start) {
        if (me == 0) {
            print("smp-sum: array of ");
            print_u64(n);
            print(" words does not fit in guest memory\n");
        }
        too_big = 1;
    }
    barrier_wait(&filled, parts);
    if (too_big) return 2;
    if (me == 0) mmio_write(DB_NOP, 0); /* marks 0..1 time the fill and the sums */
    for (u64 i = slice_start(n, me, parts); i < slice_start(n, me + 1, parts); i++) a[i] = mix64(i);
    barrier_wait(&filled, parts);
    u64 other = (me + 1) % parts, lo = slice_start(n, other, parts), hi = slice_start(n, other + 1, parts);
    u64 s = 0;
    for (u64 i = lo; i < hi; i++) s += a[i];
    atomic_fetch_add(&total, s);
    barrier_wait(&summed, parts);
    if (me != 0) return 0;
    mmio_write(DB_NOP, 1);
    print("smp-sum: n=");
    print_u64(n);
    print(" vcpus=");
    print_u64(parts);
    print(" sum=");
    print_u64(atomic_load(&total));
    print("\n");
    return 0;
}
