/* Litmus-test harness shared by the litmus-* payloads.
 *
 * Each test has `roles` participants, played by the highest-numbered vCPUs; with more vCPUs
 * than roles the low vCPUs (fragment 0, home of the image's pages) only join the per-round
 * barriers, so requester, owner and home of every shared page are different fragments. Every
 * shared variable sits on a page of its own. A round: vCPU 0 resets the variables, everyone
 * meets at the barrier, the roles play, everyone meets again, vCPU 0 checks the outcome
 * against what one x86 machine (TSO) allows. arg = rounds (0: 1000). Exit 1 if any round saw
 * a forbidden outcome; the console names the first. */
#ifndef LITMUS_H
#define LITMUS_H
#include "spanvm.h"

struct page_var { volatile u64 v; u8 pad[4096 - 8]; } __attribute__((aligned(4096)));
struct page_barrier { struct barrier b; u8 pad[4096 - sizeof(struct barrier)]; }
    __attribute__((aligned(4096)));

static struct page_barrier litmus_barrier;
static struct page_var litmus_result[4] __attribute__((unused));

struct litmus {
    const char *name;
    u64 roles; /* 0: every vCPU plays (role = vCPU id) */
    void (*reset)(void);
    void (*play)(u64 role, u64 round);
    /* 0 when the round's outcome is allowed; else prints why and returns 1 */
    u64 (*check)(u64 round);
};

static inline void mfence(void) { __asm__ volatile("mfence" ::: "memory"); }

static inline u64 litmus_vcpus(void) { return bootinfo->vcpu_count; }

static void litmus_report(const char *name, u64 round, const char *what) {
    print(name);
    print(": round ");
    print_u64(round);
    print(": forbidden outcome: ");
    print(what);
    print("\n");
}

static int litmus_run(const struct spanvm_bootinfo *bi, const struct litmus *t) {
    u64 rounds = bi->arg ? bi->arg : 1000, n = bi->vcpu_count, bad = 0;
    u64 roles = t->roles ? t->roles : n;
    if (n < roles) {
        print(t->name);
        print(": needs at least ");
        print_u64(roles);
        print(" vCPUs\n");
        return 2;
    }
    s64 role = (s64)bi->vcpu_id - (s64)(n - roles);
    for (u64 r = 1; r <= rounds; r++) {
        if (bi->vcpu_id == 0 && t->reset) t->reset();
        barrier_wait(&litmus_barrier.b, n);
        if (role >= 0) t->play((u64)role, r);
        barrier_wait(&litmus_barrier.b, n);
        if (bi->vcpu_id == 0 && t->check(r)) bad++;
        if (bi->vcpu_id == 0 && r % 250 == 0) mmio_write(DB_PUTC, '.'); /* progress */
    }
    if (bi->vcpu_id != 0) return 0;
    print("\n");
    print(t->name);
    print(": rounds=");
    print_u64(rounds);
    print(" vcpus=");
    print_u64(n);
    print(" forbidden=");
    print_u64(bad);
    print(bad ? " FAIL\n" : " OK\n");
    return bad ? 1 : 0;
}
#endif
