/* hello: every vCPU greets on the console, in vCPU order; exits 0. */
#include "spanvm.h"

static volatile u64 turn;
static struct barrier done;

int payload_main(const struct spanvm_bootinfo *bi) {
    while (atomic_load(&turn) != bi->vcpu_id) cpu_relax();
    print("hello from vCPU ");
    print_u64(bi->vcpu_id);
    print(" of ");
    print_u64(bi->vcpu_count);
    print("\n");
    atomic_store(&turn, bi->vcpu_id + 1);
    barrier_wait(&done, bi->vcpu_count);
    return 0;
}
