/* litmus-lock: every vCPU takes a test-and-set spinlock (xchg) and increments a plain,
 * non-atomic counter on another page, 4 times a round. Mutual exclusion plus coherence make
 * the counter exact: after round r it must be r * vcpus * 4. */
#include "litmus.h"

#define PER_ROUND 4
static struct page_var lock, counter;

static void play(u64 role, u64 r) {
    (void)role;
    (void)r;
    for (u64 i = 0; i < PER_ROUND; i++) {
        u64 one = 1;
        for (;;) {
            __asm__ volatile("xchgq %0, %1" : "+r"(one), "+m"(lock.v) : : "memory");
            if (one == 0) break;
            one = 1;
            while (lock.v) cpu_relax();
        }
        counter.v = counter.v + 1;
        atomic_store(&lock.v, 0);
    }
}

static u64 check(u64 r) {
    u64 want = r * litmus_vcpus() * PER_ROUND;
    if (counter.v != want) {
        litmus_report("litmus-lock", r, "lost increments");
        print("counter=");
        print_u64(counter.v);
        print(" expected=");
        print_u64(want);
        print("\n");
        counter.v = want; /* report each round's loss once */
        return 1;
    }
    return 0;
}

static const struct litmus test = {"litmus-lock", 0, 0, play, check};

int payload_main(const struct spanvm_bootinfo *bi) { return litmus_run(bi, &test); }
