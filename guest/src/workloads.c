/*
 * ftvm test guest: the workloads selected by `workload=` on the command line.
 * Output formats are documented in README.md; tests compare them exactly.
 */
#include "guest.h"

#define FNV_OFFSET  0xcbf29ce484222325ull
#define FNV_PRIME   0x100000001b3ull

/* IRQ masks for pic_set_masks(): only the named IRQ enabled. */
#define ONLY_IRQ(irq)   ((uint8_t) ~(1u << (irq)))
#define ALL_MASKED      0xff

/* Memory the mixing reads and writes, so results depend on memory too. */
static uint8_t mix_state[256];

/*
 * `rounds` steps of FNV-1a-style mixing of `sum` with mix_state, which each
 * step also updates. About 10 instructions per round.
 */
static uint64_t mix(uint64_t sum, uint64_t rounds)
{
    for (uint64_t i = 0; i < rounds; i++) {
        uint8_t *p = &mix_state[(sum ^ i) & 0xff];
        sum = (sum ^ *p ^ i) * FNV_PRIME;
        *p = (uint8_t)(sum >> 56);
    }
    return sum;
}

/* PIT at 100 Hz with only IRQ0 unmasked, then interrupts on. */
static void start_timer(void)
{
    pit_init_100hz();
    pic_set_masks(ONLY_IRQ(IRQ_TIMER), ALL_MASKED);
    sti();
}

/*
 * Short compute chunks separated by a port write: the exit on port 0x80 is a
 * deterministic point where the VMM can inject the timer interrupt. One line
 * per tick number, none skipped, each with the checksum at that moment.
 */
void workload_counter(uint64_t n_ticks)
{
    uint64_t sum = FNV_OFFSET;
    uint64_t printed = 0;

    start_timer();
    while (printed < n_ticks) {
        sum = mix(sum, 24);    /* ~250 instructions */
        outb(PORT_POST, 0);
        uint64_t now = ticks;
        while (printed < now && printed < n_ticks) {
            printed++;
            print("tick %lu sum=%lx\n", printed, sum);
        }
    }
    print("done sum=%lx\n", sum);
    guest_exit(0);
}

/* Line-reversing echo over the interrupt-driven UART receiver. */
void workload_echo(void)
{
    char line[255];
    size_t len = 0;

    pic_set_masks(ONLY_IRQ(IRQ_COM1), ALL_MASKED);
    serial_enable_rx_irq();
    sti();
    for (;;) {
        char c = (char)serial_getc();

        if (c != '\r' && c != '\n') {
            if (len < sizeof(line))
                line[len++] = c;        /* longer lines are truncated */
            continue;
        }
        if (len == 0)
            continue;
        if (len == 4 && line[0] == 'q' && line[1] == 'u' && line[2] == 'i' && line[3] == 't')
            guest_exit(0);
        serial_puts("echo ");
        while (len)
            serial_putc(line[--len]);
        serial_putc('\n');
    }
}

/*
 * One compute loop with no port I/O (no VM exits) until the timer has fired
 * max(1, ms / 10) times: the VMM must interrupt the guest on its own.
 */
void workload_spin(uint64_t ms)
{
    uint64_t target = ms / 10 ? ms / 10 : 1;
    uint64_t sum = FNV_OFFSET;

    start_timer();
    while (ticks < target)
        sum = mix(sum, 8);
    uint64_t t = ticks;
    print("spin ticks=%lu sum=%lx\n", t, sum);
    print("done\n");
    guest_exit(0);
}

/*
 * Deliberately nondeterministic: the TSC decides how much work is done and
 * what ends up in memory, and part of it is printed.
 */
void workload_rdtsc(uint64_t n)
{
    uint64_t sum = FNV_OFFSET;

    for (uint64_t i = 0; i < n; i++) {
        uint64_t tsc = rdtsc();
        sum = mix(sum ^ tsc, tsc & 0xff);
        OPAQUE(sum);
        outb(PORT_POST, 0);
        print("rdtsc %lu value=%lx\n", i, (tsc >> 4) & 0xffff);
    }
    print("done\n");
    guest_exit(0);
}

/* Read PIT channel 0 twenty times, ~2000 instructions apart (IRQ0 masked). */
void workload_pit(void)
{
    uint64_t work = FNV_OFFSET;
    unsigned changes = 0;

    pit_init_100hz();
    uint16_t first = pit_read_count();
    uint16_t prev = first;
    for (int i = 1; i < 20; i++) {
        work = mix(work, 200);  /* ~2000 instructions */
        OPAQUE(work);
        uint16_t cur = pit_read_count();
        if (cur != prev)
            changes++;
        prev = cur;
    }
    print("pit first=%u last=%u changes=%u\n", first, prev, changes);
    guest_exit(0);
}

/* A tight loop of port writes: one VM exit each (exit-rate benchmark). */
void workload_pio(uint64_t count)
{
    for (uint64_t i = 0; i < count; i++)
        outb(PORT_POST, (uint8_t)i);
    print("pio done count=%lu\n", count);
    guest_exit(0);
}

/* No usable IDT + an exception = #GP -> #DF -> triple fault (VM shutdown). */
void workload_crash(void)
{
    print("crashing\n");
    cli();
    idt_load_null();
    __asm__ volatile("ud2");
    __builtin_unreachable();
}

/* Pulse the reset line through the i8042; ftvm powers the VM off. */
void workload_reset(void)
{
    print("resetting\n");
    outb(PORT_I8042_CMD, 0xfe);
    guest_exit(4);
}

/*
 * Fills `mib` MiB from FILL_BASE with a pattern that differs per page, with
 * one REP STOSQ per page (one emulated instruction, not 512 stores).
 */
void fill_memory(uint64_t mib)
{
    for (uint64_t page = 0; page < mib * 256; page++) {
        uint64_t *p = (uint64_t *)(uintptr_t)(FILL_BASE + page * 4096);
        uint64_t value = FNV_OFFSET ^ page;
        uint64_t count = 512;
        __asm__ volatile("rep stosq"
                         : "+D"(p), "+c"(count)
                         : "a"(value)
                         : "memory");
    }
}
