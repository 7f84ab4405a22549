/* spin: every vCPU meets the others at a barrier, vCPU 0 prints one line, then every vCPU
 * spins forever without a single exit to the monitor (for stop and timeout tests). */
#include "spanvm.h"

static struct barrier ready;

int payload_main(const struct spanvm_bootinfo *bi) {
    barrier_wait(&ready, bi->vcpu_count);
    if (bi->vcpu_id == 0) {
        print("spin: ");
        print_u64(bi->vcpu_count);
        print(" vCPUs spinning\n");
    }
    for (;;) cpu_relax();
}
