/* stream: vCPU 0 writes one word (its address) into every heap page, then the last vCPU
 * reads one word of every page and prints their sum (the host knows it: the sum of the page
 * addresses). NOP doorbell marks frame the phases: 0-1 the writes, 2-3 the reads, so the host
 * can time page-fault service; with 2+ fragments the reads fetch vCPU 0's pages. vCPU 0 parks
 * rather than spin until the reads are done: a spinning vCPU took one of a 2-core test
 * machine's cores from the fault service being timed (remote fault p50 ~300 -> ~250 us). */
#include "spanvm.h"

static volatile u64 written;

int payload_main(const struct spanvm_bootinfo *bi) {
    u64 last = bi->vcpu_count - 1, sum = 0, pages = 0;
    if (bi->vcpu_id == 0) {
        mmio_write(DB_NOP, 0);
        for (u32 r = 0; r < bi->nr_ranges; r++)
            for (u64 a = bi->heap[r].start; a < bi->heap[r].end; a += 4096) *(volatile u64 *)a = a;
        mmio_write(DB_NOP, 1);
        atomic_store(&written, 1);
    }
    if (bi->vcpu_id != last) vcpu_park(); /* no spinning beside the reads being timed */
    while (!atomic_load(&written)) cpu_relax();
    mmio_write(DB_NOP, 2);
    for (u32 r = 0; r < bi->nr_ranges; r++)
        for (u64 a = bi->heap[r].start; a < bi->heap[r].end; a += 4096, pages++)
            sum += *(volatile u64 *)a;
    mmio_write(DB_NOP, 3);
    print("stream: pages=");
    print_u64(pages);
    print(" sum=");
    print_u64(sum);
    print("\n");
    vm_exit(0); /* from the last vCPU: vCPU 0 has parked */
}
