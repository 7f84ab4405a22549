/* console-remote: the last vCPU writes a 32-letter line into a page of its own; vCPU 0 then
 * has the monitor print it (console doorbell) while that page is still held, Modified, by the
 * writer's fragment, so the monitor's read must fetch it through the fabric. arg rounds
 * (default 3); round r's line is 32 letters starting at 'a' + r % 26. Exits 0. */
#include "spanvm.h"

#define LETTERS 32
static struct { char text[4096]; } line __attribute__((aligned(4096)));
static struct { volatile u64 v; u8 pad[4088]; } ready __attribute__((aligned(4096)));
static struct { volatile u64 v; u8 pad[4088]; } ack __attribute__((aligned(4096)));

int payload_main(const struct spanvm_bootinfo *bi) {
    u64 rounds = bi->arg ? bi->arg : 3, writer = bi->vcpu_count - 1;
    for (u64 r = 1; r <= rounds; r++) {
        if (bi->vcpu_id == writer) {
            while (ack.v != r - 1) cpu_relax();
            for (u64 i = 0; i < LETTERS; i++) line.text[i] = (char)('a' + (r + i) % 26);
            line.text[LETTERS] = '\n';
            atomic_store(&ready.v, r);
        }
        if (bi->vcpu_id == 0) {
            while (ready.v != r) cpu_relax();
            console_write(line.text, LETTERS + 1);
            atomic_store(&ack.v, r);
        }
    }
    return 0;
}
