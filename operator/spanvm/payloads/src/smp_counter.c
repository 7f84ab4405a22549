/* smp-counter: every vCPU does `lock xadd` on one shared counter arg times.
 * vCPU 0 reports the total; exit code 0 when it is exactly vcpus x arg. */
#include "spanvm.h"

static volatile u64 counter;
static struct barrier start, done;

int payload_main(const struct spanvm_bootinfo *bi) {
    u64 n = bi->arg;
    barrier_wait(&start, bi->vcpu_count);
    for (u64 i = 0; i < n; i++) atomic_fetch_add(&counter, 1);
    barrier_wait(&done, bi->vcpu_count);
    if (bi->vcpu_id != 0) return 0;
    u64 total = atomic_load(&counter), expected = n * bi->vcpu_count;
    print("smp-counter: vcpus=");
    print_u64(bi->vcpu_count);
    print(" n=");
    print_u64(n);
    print(" total=");
    print_u64(total);
    print(" expected=");
    print_u64(expected);
    print(total == expected ? " OK\n" : " MISMATCH\n");
    return total == expected ? 0 : 1;
}
