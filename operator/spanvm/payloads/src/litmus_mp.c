/* litmus-mp (message passing): the writer stores data=r then flag=r; the reader loads flag
 * then data, once each. TSO allows flag and data in {r-1, r} but never flag=r with data=r-1. */
#include "litmus.h"

static struct page_var data, flag;

static void play(u64 role, u64 r) {
    if (role == 0) {
        data.v = r;
        flag.v = r;
    } else {
        u64 f = flag.v;
        u64 d = data.v;
        litmus_result[0].v = f;
        litmus_result[1].v = d;
    }
}

static u64 check(u64 r) {
    u64 f = litmus_result[0].v, d = litmus_result[1].v;
    if ((f != r && f != r - 1) || (d != r && d != r - 1) || (f == r && d != r)) {
        litmus_report("litmus-mp", r, "");
        print("flag=");
        print_u64(f);
        print(" data=");
        print_u64(d);
        print("\n");
        return 1;
    }
    return 0;
}

static const struct litmus test = {"litmus-mp", 2, 0, play, check};

int payload_main(const struct spanvm_bootinfo *bi) { return litmus_run(bi, &test); }
