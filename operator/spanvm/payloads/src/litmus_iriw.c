/* litmus-iriw (independent reads of independent writes): roles 0 and 1 store x=1 and y=1;
 * role 2 loads x then y, role 3 loads y then x. x86 stores are seen in one order by all, so
 * role 2 seeing x=1,y=0 while role 3 sees y=1,x=0 is forbidden. */
#include "litmus.h"

static struct page_var x, y;

static void reset(void) { x.v = y.v = 0; }

static void play(u64 role, u64 r) {
    (void)r;
    if (role == 0) {
        x.v = 1;
    } else if (role == 1) {
        y.v = 1;
    } else if (role == 2) {
        u64 a = x.v;
        u64 b = y.v;
        litmus_result[0].v = a;
        litmus_result[1].v = b;
    } else {
        u64 c = y.v;
        u64 d = x.v;
        litmus_result[2].v = c;
        litmus_result[3].v = d;
    }
}

static u64 check(u64 r) {
    if (litmus_result[0].v == 1 && litmus_result[1].v == 0 && litmus_result[2].v == 1 &&
        litmus_result[3].v == 0) {
        litmus_report("litmus-iriw", r, "readers saw the two stores in opposite orders");
        return 1;
    }
    return 0;
}

static const struct litmus test = {"litmus-iriw", 4, reset, play, check};

int payload_main(const struct spanvm_bootinfo *bi) { return litmus_run(bi, &test); }
