/* litmus-2p2w (2+2W): role 0 stores x=1 then y=2, role 1 stores y=1 then x=2. TSO keeps each
 * role's stores in order, so the final x=1 with y=1 is forbidden. */
#include "litmus.h"

static struct page_var x, y;

static void reset(void) { x.v = y.v = 0; }

static void play(u64 role, u64 r) {
    (void)r;
    if (role == 0) {
        x.v = 1;
        y.v = 2;
    } else {
        y.v = 1;
        x.v = 2;
    }
}

static u64 check(u64 r) {
    if (x.v == 1 && y.v == 1) {
        litmus_report("litmus-2p2w", r, "final x=1 and y=1");
        return 1;
    }
    return 0;
}

static const struct litmus test = {"litmus-2p2w", 2, reset, play, check};

int payload_main(const struct spanvm_bootinfo *bi) { return litmus_run(bi, &test); }
