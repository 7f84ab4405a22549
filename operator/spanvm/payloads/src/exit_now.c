/* exit-now: vCPU 0 exits at once with code arg; every other vCPU spins until the VM stops.
 * The VM ends while other fragments may still be joining: the exit must reach them all. */
#include "spanvm.h"

int payload_main(const struct spanvm_bootinfo *bi) {
    if (bi->vcpu_id == 0) return (int)bi->arg;
    for (;;) cpu_relax();
}
