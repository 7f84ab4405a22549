/* zeropage-probe: a ring-0 test kernel entered through the Linux 64-bit boot protocol. It
 * prints on COM1 what the loader handed over in the zero page (struct boot_params, offsets
 * from Linux Documentation/arch/x86/zero-page.rst and boot.rst) - one fact per line - and
 * exits 0 through isa-debug-exit. Kept tiny: at CPL0 every instruction is emulated here.
 *
 *   entry cs=0x10 rflags=0x2          the state the protocol promises
 *   zeropage 0x7000                   rsi
 *   boot_flag 0xaa55 | header 0x53726448 | version 0x20f | type_of_loader 0xff | ...
 *   cmdline <the command line>
 *   e820 <index> <start> <size> <type>
 *   initrd <address> <size> fnv1a <FNV-1a 32 of its bytes>
 *   acpi_rsdp 0xe0000                 then the ACPI tables: RSDP -> XSDT -> each table,
 *   acpi_rsdp_signature RSD PTR       its MADT, SRAT and SLIT entries:
 *   acpi_table <signature>
 *   madt lapic <APIC id> <flags>      (x2apic, ioapic <id> <address> <GSI base>,
 *                                      override <irq> <GSI> <flags>)
 *   srat cpu <APIC id> <domain> <flags>
 *   srat memory <domain> <base> <length> <flags>
 *   slit <distance to node 0> <to node 1> ...
 *   done
 */

typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define COM1 0x3f8

/* struct boot_params offsets (zero-page.rst; setup header fields from boot.rst). */
#define BP_ACPI_RSDP_ADDR 0x070
#define BP_EXT_RAMDISK_IMAGE 0x0c0
#define BP_EXT_RAMDISK_SIZE 0x0c4
#define BP_EXT_CMD_LINE_PTR 0x0c8
#define BP_E820_ENTRIES 0x1e8
#define BP_BOOT_FLAG 0x1fe
#define BP_HEADER 0x202
#define BP_VERSION 0x206
#define BP_TYPE_OF_LOADER 0x210
#define BP_LOADFLAGS 0x211
#define BP_RAMDISK_IMAGE 0x218
#define BP_RAMDISK_SIZE 0x21c
#define BP_CMD_LINE_PTR 0x228
#define BP_CMDLINE_SIZE 0x238
#define BP_E820_TABLE 0x2d0
#define E820_ENTRY_SIZE 20

static inline void outb(u16 port, u8 value)
{
    __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static void put_char(char c) { outb(COM1, (u8)c); }

static void put_str(const char *s)
{
    while (*s)
        put_char(*s++);
}

static void put_hex(u64 value)
{
    char digits[19];
    int i = 18;
    digits[i] = 0;
    do {
        digits[--i] = "0123456789abcdef"[value & 15];
        value >>= 4;
    } while (value);
    digits[--i] = 'x';
    digits[--i] = '0';
    put_str(&digits[i]);
}

static void fact(const char *name, u64 value)
{
    put_str(name);
    put_char(' ');
    put_hex(value);
    put_char('\n');
}

/* Unaligned little-endian reads: fields of boot_params are packed. */
static u64 get(const u8 *p, int size)
{
    u64 value = 0;
    while (size--)
        value = (value << 8) | p[size];
    return value;
}

static void report_e820(const u8 *bp)
{
    u64 n = bp[BP_E820_ENTRIES];
    for (u64 i = 0; i < n; i++) {
        const u8 *e = bp + BP_E820_TABLE + i * E820_ENTRY_SIZE;
        put_str("e820 ");
        put_hex(i);
        put_char(' ');
        put_hex(get(e, 8));
        put_char(' ');
        put_hex(get(e + 8, 8));
        put_char(' ');
        put_hex(get(e + 16, 4));
        put_char('\n');
    }
}

static void report_initrd(const u8 *bp)
{
    u64 image = get(bp + BP_RAMDISK_IMAGE, 4) | get(bp + BP_EXT_RAMDISK_IMAGE, 4) << 32;
    u64 size = get(bp + BP_RAMDISK_SIZE, 4) | get(bp + BP_EXT_RAMDISK_SIZE, 4) << 32;
    const u8 *data = (const u8 *)image;
    u32 hash = 2166136261u; /* FNV-1a, 32 bits */
    for (u64 i = 0; i < size; i++)
        hash = (hash ^ data[i]) * 16777619u;
    put_str("initrd ");
    put_hex(image);
    put_char(' ');
    put_hex(size);
    put_str(" fnv1a ");
    put_hex(hash);
    put_char('\n');
}

static void put_fields(const char *what, u64 a, u64 b, u64 c, u64 d, int n)
{
    u64 values[4] = {a, b, c, d};
    put_str(what);
    for (int i = 0; i < n; i++) {
        put_char(' ');
        put_hex(values[i]);
    }
    put_char('\n');
}

static int signature_is(const u8 *table, const char *sig)
{
    for (int i = 0; i < 4; i++)
        if (table[i] != (u8)sig[i])
            return 0;
    return 1;
}

/* MADT (ACPI 6.5 5.2.12): interrupt controller structures after the 44-byte header. */
static void report_madt(const u8 *t)
{
    u64 length = get(t + 4, 4);
    for (u64 at = 44; at + 2 <= length;) {
        const u8 *e = t + at;
        u64 type = e[0], size = e[1];
        if (size < 2)
            break;
        if (type == 0) /* Processor Local APIC: uid, APIC id, flags */
            put_fields("madt lapic", e[3], get(e + 4, 4), 0, 0, 2);
        else if (type == 9) /* Processor Local x2APIC: x2APIC id, flags */
            put_fields("madt x2apic", get(e + 4, 4), get(e + 8, 4), 0, 0, 2);
        else if (type == 1) /* I/O APIC: id, address, GSI base */
            put_fields("madt ioapic", e[2], get(e + 4, 4), get(e + 8, 4), 0, 3);
        else if (type == 2) /* Interrupt Source Override: bus irq, GSI, flags */
            put_fields("madt override", e[3], get(e + 4, 4), get(e + 8, 2), 0, 3);
        at += size;
    }
}

/* SRAT (5.2.16): affinity structures after the 48-byte header. */
static void report_srat(const u8 *t)
{
    u64 length = get(t + 4, 4);
    for (u64 at = 48; at + 2 <= length;) {
        const u8 *e = t + at;
        u64 type = e[0], size = e[1];
        if (size < 2)
            break;
        if (type == 0) /* Processor Local APIC affinity: domain (split), APIC id, flags */
            put_fields("srat cpu", e[3], e[2] | get(e + 9, 3) << 8, get(e + 4, 4), 0, 3);
        else if (type == 2) /* Processor Local x2APIC affinity */
            put_fields("srat cpu", get(e + 8, 4), get(e + 4, 4), get(e + 12, 4), 0, 3);
        else if (type == 1) /* Memory affinity: domain, base, length, flags */
            put_fields("srat memory", get(e + 2, 4), get(e + 8, 8), get(e + 16, 8),
                       get(e + 28, 4), 4);
        at += size;
    }
}

/* SLIT (5.2.17): the locality count, then the distance matrix row by row. */
static void report_slit(const u8 *t)
{
    u64 n = get(t + 36, 8);
    for (u64 i = 0; i < n; i++) {
        put_str("slit");
        for (u64 j = 0; j < n; j++) {
            put_char(' ');
            put_hex(t[44 + i * n + j]);
        }
        put_char('\n');
    }
}

/* The ACPI tables the VMM wrote: RSDP (5.2.5.3) -> XSDT (5.2.8) -> MADT, SRAT, SLIT. */
static void report_acpi(const u8 *bp)
{
    u64 rsdp = get(bp + BP_ACPI_RSDP_ADDR, 8);
    fact("acpi_rsdp", rsdp);
    if (!rsdp)
        return;
    const u8 *r = (const u8 *)rsdp;
    put_str("acpi_rsdp_signature ");
    for (int i = 0; i < 8; i++)
        put_char((char)r[i]);
    put_char('\n');
    const u8 *xsdt = (const u8 *)get(r + 24, 8);
    u64 entries = (get(xsdt + 4, 4) - 36) / 8;
    for (u64 i = 0; i < entries; i++) {
        const u8 *table = (const u8 *)get(xsdt + 36 + i * 8, 8);
        put_str("acpi_table ");
        for (int k = 0; k < 4; k++)
            put_char((char)table[k]);
        put_char('\n');
        if (signature_is(table, "APIC"))
            report_madt(table);
        else if (signature_is(table, "SRAT"))
            report_srat(table);
        else if (signature_is(table, "SLIT"))
            report_slit(table);
    }
}

int kernel_main(const u8 *bp, u64 cs, u64 rflags)
{
    put_str("entry cs ");
    put_hex(cs);
    put_str(" rflags ");
    put_hex(rflags);
    put_char('\n');
    fact("zeropage", (u64)bp);
    fact("boot_flag", get(bp + BP_BOOT_FLAG, 2));
    fact("header", get(bp + BP_HEADER, 4));
    fact("version", get(bp + BP_VERSION, 2));
    fact("type_of_loader", bp[BP_TYPE_OF_LOADER]);
    fact("loadflags", bp[BP_LOADFLAGS]);
    fact("cmdline_size", get(bp + BP_CMDLINE_SIZE, 4));
    put_str("cmdline ");
    put_str((const char *)(get(bp + BP_CMD_LINE_PTR, 4) | get(bp + BP_EXT_CMD_LINE_PTR, 4) << 32));
    put_char('\n');
    report_e820(bp);
    report_initrd(bp);
    report_acpi(bp);
    put_str("done\n");
    return 0;
}
