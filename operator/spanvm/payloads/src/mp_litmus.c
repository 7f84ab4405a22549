/* mp-litmus (message passing): vCPU 0 writes eight data words then a flag; vCPU 1 waits for
 * the flag and checks every data word, then acknowledges; arg rounds. Data, flag and ack sit
 * on different pages. Any stale word seen after the flag is a violation; exit 1 if any. */
#include "spanvm.h"

#define WORDS 8
static struct { volatile u64 w[WORDS]; } data __attribute__((aligned(4096)));
static volatile u64 flag __attribute__((aligned(4096)));
static volatile u64 ack __attribute__((aligned(4096)));
static volatile u64 violations;
static struct barrier done;

static u64 expect(u64 round, u64 k) { return round * 0x100 + k; }

int payload_main(const struct spanvm_bootinfo *bi) {
    u64 rounds = bi->arg;
    if (bi->vcpu_count < 2) {
        print("mp-litmus: needs at least 2 vCPUs\n");
        return 2;
    }
    if (bi->vcpu_id == 0) {
        for (u64 r = 1; r <= rounds; r++) {
            for (u64 k = 0; k < WORDS; k++) data.w[k] = expect(r, k);
            flag = r;
            while (ack != r) cpu_relax();
        }
    } else if (bi->vcpu_id == 1) {
        for (u64 r = 1; r <= rounds; r++) {
            while (flag != r) cpu_relax();
            for (u64 k = 0; k < WORDS; k++)
                if (data.w[k] != expect(r, k)) violations++;
            ack = r;
        }
    }
    barrier_wait(&done, bi->vcpu_count);
    if (bi->vcpu_id != 0) return 0;
    print("mp-litmus: rounds=");
    print_u64(rounds);
    print(" violations=");
    print_u64(violations);
    print("\n");
    return violations ? 1 : 0;
}
