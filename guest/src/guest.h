/*
 * ftvm test guest: shared declarations.
 *
 * Freestanding C (no libc). Only the compiler's own freestanding headers are
 * used. All code is built with -mgeneral-regs-only: no FPU/SSE anywhere.
 */
#ifndef FTVM_GUEST_H
#define FTVM_GUEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define NORETURN __attribute__((noreturn))

/* ---- I/O ports used by the guest (see README.md) ---- */
#define PORT_PIT_CH0      0x40
#define PORT_PIT_CMD      0x43
#define PORT_PIC1_CMD     0x20
#define PORT_PIC1_DATA    0x21
#define PORT_PIC2_CMD     0xa0
#define PORT_PIC2_DATA    0xa1
#define PORT_I8042_CMD    0x64
#define PORT_POST         0x80  /* POST code: writes ignored, a cheap VM exit */
#define PORT_DEBUG_EXIT   0xf4  /* write = end the VM with that exit status */
#define PORT_COM1         0x3f8

/* Interrupt vectors: exceptions 0-31, PIC IRQ 0-15 remapped to 0x20-0x2f. */
#define IRQ_BASE          0x20
#define IRQ_TIMER         0     /* PIT channel 0 */
#define IRQ_COM1          4

/* ---- Port I/O and CPU helpers ---- */
static inline void outb(uint16_t port, uint8_t val)
{
    __asm__ volatile("outb %0, %1" : : "a"(val), "Nd"(port) : "memory");
}

static inline uint8_t inb(uint16_t port)
{
    uint8_t val;
    __asm__ volatile("inb %1, %0" : "=a"(val) : "Nd"(port) : "memory");
    return val;
}

static inline void outw(uint16_t port, uint16_t val)
{
    __asm__ volatile("outw %0, %1" : : "a"(val), "Nd"(port) : "memory");
}

static inline uint16_t inw(uint16_t port)
{
    uint16_t val;
    __asm__ volatile("inw %1, %0" : "=a"(val) : "Nd"(port) : "memory");
    return val;
}

static inline void cli(void) { __asm__ volatile("cli" : : : "memory"); }
static inline void sti(void) { __asm__ volatile("sti" : : : "memory"); }

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

/* Compiler barrier that also makes `v` opaque, so busy loops stay loops. */
#define OPAQUE(v) __asm__ volatile("" : "+r"(v))

/* ---- main.c ---- */
NORETURN void guest_exit(int status);
void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);

/* ---- serial.c: COM1 16550 ---- */
void serial_init(void);
void serial_putc(char c);
void serial_puts(const char *s);
/* Minimal printf: %s %c %u %d %x %lu %ld %lx %%. Hex is lowercase, no 0x. */
void print(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void serial_enable_rx_irq(void);
void serial_irq(void);          /* IRQ4 handler body (without the EOI) */
int serial_getc(void);          /* blocks (sti; hlt) until a byte arrives */

/* ---- pic_pit.c: 8259A pair and 8254 ---- */
void pic_init(void);            /* remap to 0x20-0x2f, all masked */
void pic_set_masks(uint8_t master, uint8_t slave);
void pic_eoi(unsigned irq);
void pit_init_100hz(void);
uint16_t pit_read_count(void);

/* ---- idt.c ---- */
extern volatile uint64_t ticks;     /* IRQ0 count */
void idt_init(void);
void idt_load_null(void);       /* zero-limit IDT: next exception triple-faults */

/* ---- workloads.c (each ends the VM through guest_exit) ---- */
NORETURN void workload_counter(uint64_t n_ticks);
NORETURN void workload_echo(void);
NORETURN void workload_spin(uint64_t ms);
NORETURN void workload_rdtsc(uint64_t n);

/* fill=MIB: memory from FILL_BASE (32 MiB) made non-zero before the workload. */
#define FILL_BASE 0x2000000ull
void fill_memory(uint64_t mib);
NORETURN void workload_pit(void);
NORETURN void workload_pio(uint64_t count);
NORETURN void workload_crash(void);
NORETURN void workload_reset(void);

/* ---- netecho.c ---- */
NORETURN void workload_netecho(uint64_t n);

/* ---- diskread.c ---- */
NORETURN void workload_diskread(uint64_t passes, bool sum, bool wait);

#endif /* FTVM_GUEST_H */
