/*
 * ftvm test guest: C entry point, command line, exit, libc replacements.
 */
#include "guest.h"

/* Linux boot_params ("zero page") fields, see Documentation/arch/x86/zero-page.rst. */
#define BP_EXT_CMD_LINE_PTR 0x0c8   /* u32: upper 32 bits of the command line address */
#define BP_CMD_LINE_PTR     0x228   /* u32: hdr.cmd_line_ptr */
#define BP_CMDLINE_SIZE     0x238   /* u32: hdr.cmdline_size */

#define CMDLINE_MAX         4096    /* bound when cmdline_size is 0 or absurd */

/* A slice of the command line; not NUL-terminated. ptr == NULL: absent. */
typedef struct {
    const char *ptr;
    size_t len;
} str_t;

NORETURN void guest_main(const void *boot_params);

NORETURN void guest_exit(int status)
{
    outb(PORT_DEBUG_EXIT, (uint8_t)status);
    for (;;)                        /* not reached under ftvm */
        __asm__ volatile("cli; hlt" : : : "memory");
}

/*
 * gcc may emit calls to these even in freestanding code (structure copies,
 * large initialisers), so provide them. The loops cannot be turned back into
 * memset/memcpy calls: the build uses -fno-tree-loop-distribute-patterns.
 */
void *memset(void *dst, int c, size_t n)
{
    uint8_t *d = dst;

    while (n--)
        *d++ = (uint8_t)c;
    return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
    uint8_t *d = dst;
    const uint8_t *s = src;

    while (n--)
        *d++ = *s++;
    return dst;
}

static uint32_t read_u32(const void *base, size_t offset)
{
    return *(const volatile uint32_t *)((const uint8_t *)base + offset);
}

static bool str_eq(str_t s, const char *lit)
{
    size_t i;

    if (!s.ptr)
        return false;
    for (i = 0; i < s.len; i++)
        if (lit[i] != s.ptr[i])     /* also stops at lit's NUL */
            return false;
    return lit[i] == '\0';
}

/* Strict decimal: digits only, no sign, no overflow. */
static bool parse_u64(str_t s, uint64_t *out)
{
    uint64_t v = 0;

    if (!s.ptr || s.len == 0)
        return false;
    for (size_t i = 0; i < s.len; i++) {
        unsigned d = (unsigned)(s.ptr[i] - '0');
        if (d > 9 || v > (UINT64_MAX - d) / 10)
            return false;
        v = v * 10 + d;
    }
    *out = v;
    return true;
}

/* Value of a numeric option, or `def` when it is absent or malformed. */
static uint64_t num_or(str_t s, uint64_t def)
{
    uint64_t v;

    return parse_u64(s, &v) ? v : def;
}

static bool is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

void guest_main(const void *boot_params)
{
    serial_init();
    idt_init();
    pic_init();                     /* remapped, everything masked */

    /* Options we understand; a later duplicate overrides an earlier one. */
    str_t workload = {0}, opt_ticks = {0}, opt_ms = {0}, opt_n = {0}, opt_count = {0};
    str_t opt_fill = {0}, opt_sum = {0}, opt_wait = {0};

    uint64_t addr = ((uint64_t)read_u32(boot_params, BP_EXT_CMD_LINE_PTR) << 32) |
                    read_u32(boot_params, BP_CMD_LINE_PTR);
    size_t max = read_u32(boot_params, BP_CMDLINE_SIZE);
    if (max == 0 || max > CMDLINE_MAX)
        max = CMDLINE_MAX;
    const char *cmdline = (const char *)(uintptr_t)addr;
    size_t len = 0;
    if (cmdline)
        while (len < max && cmdline[len])
            len++;

    /* Space-separated key=value tokens; others are ignored. */
    for (size_t i = 0; i < len;) {
        while (i < len && is_space(cmdline[i]))
            i++;
        size_t start = i, eq = SIZE_MAX;   /* eq: index of the first '=' */
        while (i < len && !is_space(cmdline[i])) {
            if (eq == SIZE_MAX && cmdline[i] == '=')
                eq = i;
            i++;
        }
        if (eq == SIZE_MAX)
            continue;
        str_t key = {cmdline + start, eq - start};
        str_t val = {cmdline + eq + 1, i - eq - 1};

        if (str_eq(key, "workload"))
            workload = val;
        else if (str_eq(key, "ticks"))
            opt_ticks = val;
        else if (str_eq(key, "ms"))
            opt_ms = val;
        else if (str_eq(key, "n"))
            opt_n = val;
        else if (str_eq(key, "count"))
            opt_count = val;
        else if (str_eq(key, "fill"))
            opt_fill = val;
        else if (str_eq(key, "sum"))
            opt_sum = val;
        else if (str_eq(key, "wait"))
            opt_wait = val;
    }

    /* fill=MIB: make MIB MiB of memory from 32 MiB on non-zero before the workload runs
     * (for sync and checkpoint tests and benchmarks: a zero page is never sent). */
    fill_memory(num_or(opt_fill, 0));

    if (!workload.ptr || str_eq(workload, "counter"))
        workload_counter(num_or(opt_ticks, 10));
    if (str_eq(workload, "echo"))
        workload_echo();
    if (str_eq(workload, "spin"))
        workload_spin(num_or(opt_ms, 100));
    if (str_eq(workload, "rdtsc"))
        workload_rdtsc(num_or(opt_n, 8));
    if (str_eq(workload, "pit"))
        workload_pit();
    if (str_eq(workload, "pio"))
        workload_pio(num_or(opt_count, 100000));
    if (str_eq(workload, "crash"))
        workload_crash();
    if (str_eq(workload, "reset"))
        workload_reset();
    if (str_eq(workload, "netecho"))
        workload_netecho(num_or(opt_n, 3));
    if (str_eq(workload, "diskread"))
        workload_diskread(num_or(opt_n, 1), num_or(opt_sum, 1) != 0,
                          num_or(opt_wait, 0) != 0);

    serial_puts("error: unknown workload ");
    for (size_t i = 0; i < workload.len; i++)
        serial_putc(workload.ptr[i]);
    serial_putc('\n');
    guest_exit(2);
}
