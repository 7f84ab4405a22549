/* litmus-sb (store buffering with fences): each role stores 1 to its variable, fences, then
 * loads the other's. With mfence TSO forbids both loads returning 0. */
#include "litmus.h"

static struct page_var x, y;

static void reset(void) { x.v = y.v = 0; }

static void play(u64 role, u64 r) {
    (void)r;
    if (role == 0) {
        x.v = 1;
        mfence();
        litmus_result[0].v = y.v;
    } else {
        y.v = 1;
        mfence();
        litmus_result[1].v = x.v;
    }
}

static u64 check(u64 r) {
    if (litmus_result[0].v == 0 && litmus_result[1].v == 0) {
        litmus_report("litmus-sb", r, "both loads returned 0");
        return 1;
    }
    return 0;
}

static const struct litmus test = {"litmus-sb", 2, reset, play, check};

int payload_main(const struct spanvm_bootinfo *bi) { return litmus_run(bi, &test); }
