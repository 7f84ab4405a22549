/* fault-now: vCPU arg (default 0) executes an invalid opcode at once (the VM stops on the guest
 * exception, reported by vector); every other vCPU spins until the VM stops. */
#include "spanvm.h"

int payload_main(const struct spanvm_bootinfo *bi) {
    if (bi->vcpu_id == bi->arg) __asm__ volatile("ud2");
    for (;;) cpu_relax();
}
