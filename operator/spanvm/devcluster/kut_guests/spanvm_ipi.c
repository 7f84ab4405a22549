/*
 * spanvm's IPI test, built against kvm-unit-tests' x86 library (lib/x86: apic, isr, smp)
 * by spanvm.devcluster.kvm_unit_tests.build_guest. It needs 2 vCPUs; spanvm runs them in
 * one fragment or in two, and every check must hold either way.
 *
 *   ping-pong  CPU 0 sends fixed IPIs to CPU 1 (physical destination), each answered by a
 *              fixed IPI back; the vectors cycle through 16 values per direction, so each
 *              side checks that every IPI arrived once and in the order sent.
 *   nmi        CPU 0 sends NMIs to CPU 1, one at a time; each must arrive once.
 *   allbut     CPU 0 sends fixed IPIs with the all-but-self shorthand; CPU 1 counts them.
 *   self       CPU 1 sends IPIs to itself (shorthand self): they stay local.
 *   tsc        CPU 0 reads its TSC and sends the value with an IPI; CPU 1's TSC read on
 *              arrival must not be smaller (one clock across fragments).
 *   flood      CPU 1 reads one byte of each of PAGES fresh pages at 64 MiB (homed on the
 *              first fragment: with 2 fragments each is a remote fault), once quietly and
 *              once while CPU 0 sends IPIs to CPU 1 without pause (CPU 1 keeps interrupts
 *              off meanwhile, so only the fabric carries the flood); it prints both
 *              "walk cycles per page" figures.
 *
 * Arguments (the Multiboot command line): ROUNDS NMIS TSCS PAGES, the ping-pong round
 * trips (default 10000), NMIs (default 1000), TSC messages (default 200) and pages per walk
 * (default 256). It prints "cycles per round trip: C" (TSC
 * cycles) for hack/bench/ipi.py. Intel SDM vol. 3A §11.6 (ICR), §11.8 (handling interrupts).
 */
#include "libcflat.h"
#include "apic.h"
#include "smp.h"
#include "isr.h"
#include "processor.h"
#include "atomic.h"

#define PING_BASE 0x40
#define PONG_BASE 0x60
#define ALLBUT_VECTOR 0x80
#define SELF_VECTOR 0x81
#define TSC_VECTOR 0x82
#define FLOOD_VECTOR 0x83
#define WALK_BASE (64ul << 20)
#define CYCLE 16

/* Each CPU's counters on a page of its own: the ping-pong loop moves no guest page. */
struct side {
	volatile unsigned long seen, errors, nmis, allbut, self, tsc_seen, tsc_backwards, floods;
	volatile unsigned long long walk_cycles;
	volatile int walk_done;
	volatile unsigned long long tsc_sent;
	volatile int ready;
} __attribute__((aligned(4096)));

static struct side cpu0 __attribute__((aligned(4096)));
static struct side cpu1 __attribute__((aligned(4096)));

/* The n-th number among the arguments (whether argv[0] is a program name or not). */
static unsigned long arg(int argc, char **argv, int n, unsigned long fallback)
{
	int i;

	for (i = 0; i < argc; i++)
		if (argv[i][0] >= '0' && argv[i][0] <= '9' && n-- == 0)
			return atol(argv[i]);
	return fallback;
}

static void send(unsigned vector, unsigned dest)
{
	apic_icr_write(APIC_DEST_PHYSICAL | APIC_DM_FIXED | APIC_INT_ASSERT | vector, dest);
}

/* One handler per vector: the handler knows which vector it serves. */
#define PING_HANDLER(n)                                                        \
	static void ping_##n(isr_regs_t *regs)                                 \
	{                                                                      \
		if (cpu1.seen % CYCLE != n)                                    \
			cpu1.errors++;                                         \
		cpu1.seen++;                                                   \
		eoi();                                                         \
		send(PONG_BASE + n, id_map[0]);                                \
	}
#define PONG_HANDLER(n)                                                        \
	static void pong_##n(isr_regs_t *regs)                                 \
	{                                                                      \
		if (cpu0.seen % CYCLE != n)                                    \
			cpu0.errors++;                                         \
		cpu0.seen++;                                                   \
		eoi();                                                         \
	}
#define EACH(m) m(0) m(1) m(2) m(3) m(4) m(5) m(6) m(7) m(8) m(9) m(10) m(11) m(12) m(13) m(14) m(15)
EACH(PING_HANDLER)
EACH(PONG_HANDLER)
#define REF_PING(n) ping_##n,
#define REF_PONG(n) pong_##n,
static void (*pings[CYCLE])(isr_regs_t *) = { EACH(REF_PING) };
static void (*pongs[CYCLE])(isr_regs_t *) = { EACH(REF_PONG) };

static void nmi_handler(isr_regs_t *regs)
{
	cpu1.nmis++;
}

static void allbut_handler(isr_regs_t *regs)
{
	cpu1.allbut++;
	eoi();
}

static void self_handler(isr_regs_t *regs)
{
	cpu1.self++;
	eoi();
}

static void tsc_handler(isr_regs_t *regs)
{
	unsigned long long now = rdtsc();

	if (now < cpu0.tsc_sent)
		cpu1.tsc_backwards++;
	cpu1.tsc_seen++;
	eoi();
}

static void self_ipis(void *data)
{
	unsigned long i;

	sti();  /* on_cpu runs this inside its IPI's handler */
	for (i = 0; i < CYCLE; i++) {
		apic_icr_write(APIC_DEST_SELF | APIC_DM_FIXED | APIC_INT_ASSERT | SELF_VECTOR, 0);
		while (cpu1.self < i + 1)
			pause();
	}
}

static void flood_handler(isr_regs_t *regs)
{
	cpu1.floods++;
	eoi();
}

/* On CPU 1 with interrupts off (inside on_cpu's IPI handler): touch each page once. */
static void walk(void *data)
{
	volatile unsigned char *at = data;
	unsigned long i, pages = (unsigned long)at & 0xfff;
	unsigned long long start = rdtsc();

	at = (volatile unsigned char *)((unsigned long)at & ~0xffful);
	for (i = 0; i < pages; i++)
		(void)at[i * 4096];
	cpu1.walk_cycles = rdtsc() - start;
	cpu1.walk_done = 1;
}

static unsigned long long walk_on_cpu1(unsigned long base, unsigned long pages, bool flood)
{
	unsigned long sent = 0;

	cpu1.walk_done = 0;
	on_cpu_async(1, walk, (void *)(base | pages));
	while (!cpu1.walk_done) {
		if (flood) {
			send(FLOOD_VECTOR, id_map[1]);
			sent++;
		} else {
			pause();
		}
	}
	if (flood)
		printf("flood: %lu IPIs sent during the walk\n", sent);
	return cpu1.walk_cycles;
}

static void responder(void *data)
{
	int i;

	for (i = 0; i < CYCLE; i++)
		handle_irq(PING_BASE + i, pings[i]);
	handle_irq(2, nmi_handler);
	handle_irq(ALLBUT_VECTOR, allbut_handler);
	handle_irq(SELF_VECTOR, self_handler);
	handle_irq(TSC_VECTOR, tsc_handler);
	handle_irq(FLOOD_VECTOR, flood_handler);
	sti();
	cpu1.ready = 1;
	while (1)
		safe_halt();
}

static void wait_for(volatile unsigned long *counter, unsigned long value)
{
	while (*counter < value)
		pause();
}

int main(int argc, char **argv)
{
	unsigned long rounds = arg(argc, argv, 0, 10000);
	unsigned long nmis = arg(argc, argv, 1, 1000);
	unsigned long tscs = arg(argc, argv, 2, 200);
	unsigned long pages = arg(argc, argv, 3, 256);
	unsigned long long quiet, flooded;
	unsigned long i;
	unsigned long long start, cycles;

	if (cpu_count() < 2) {
		report_skip("needs 2 vCPUs");
		return report_summary();
	}
	for (i = 0; i < CYCLE; i++)
		handle_irq(PONG_BASE + i, pongs[i]);
	sti();
	printf("APIC mode: %s\n", is_x2apic_enabled() ? "x2APIC" : "xAPIC");
	on_cpu_async(1, responder, NULL);
	while (!cpu1.ready)
		pause();

	start = rdtsc();
	for (i = 0; i < rounds; i++) {
		send(PING_BASE + i % CYCLE, id_map[1]);
		wait_for(&cpu0.seen, i + 1);
	}
	cycles = rdtsc() - start;
	printf("cycles per round trip: %llu\n", rounds ? cycles / rounds : 0);
	report(cpu0.seen == rounds && cpu0.errors == 0,
	       "%lu pongs arrived once each, in order", rounds);
	report(cpu1.seen == rounds && cpu1.errors == 0,
	       "%lu pings arrived once each, in order", rounds);

	for (i = 0; i < nmis; i++) {
		apic_icr_write(APIC_DEST_PHYSICAL | APIC_DM_NMI | APIC_INT_ASSERT, id_map[1]);
		wait_for(&cpu1.nmis, i + 1);
	}
	report(cpu1.nmis == nmis, "%lu NMIs arrived once each", nmis);

	for (i = 0; i < CYCLE; i++) {
		apic_icr_write(APIC_DEST_ALLBUT | APIC_DM_FIXED | APIC_INT_ASSERT | ALLBUT_VECTOR, 0);
		wait_for(&cpu1.allbut, i + 1);
	}
	report(cpu1.allbut == CYCLE, "all-but-self IPIs arrived once each");

	on_cpu(1, self_ipis, NULL);
	report(cpu1.self == CYCLE, "self IPIs arrived once each");

	for (i = 0; i < tscs; i++) {
		cpu0.tsc_sent = rdtsc();
		send(TSC_VECTOR, id_map[1]);
		wait_for(&cpu1.tsc_seen, i + 1);
	}
	report(cpu1.tsc_seen == tscs && cpu1.tsc_backwards == 0,
	       "TSC never went backwards from CPU 0 to CPU 1 (%lu of %lu)", cpu1.tsc_backwards,
	       tscs);

	if (pages > 0xfff)
		pages = 0xfff;
	if (pages) {
		quiet = walk_on_cpu1(WALK_BASE, pages, false);
		flooded = walk_on_cpu1(WALK_BASE + 0x1000000, pages, true);
		printf("walk cycles per page: quiet %llu, flood %llu\n", quiet / pages,
		       flooded / pages);
		report(cpu1.walk_done, "page walks under an IPI flood completed");
	}
	return report_summary();
}
