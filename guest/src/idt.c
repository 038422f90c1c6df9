/*
 * ftvm test guest: IDT and interrupt dispatch.
 */
#include "guest.h"

#define KERNEL_CS           0x10    /* the VMM's 64-bit code selector */
#define GATE_INTERRUPT      0x8e    /* present, DPL 0, 64-bit interrupt gate (IF cleared) */
#define ISR_STUB_SIZE       16      /* see isr.S */

/* 64-bit IDT gate descriptor (Intel SDM Vol. 3, 6.14.1). */
struct idt_gate {
    uint16_t offset_lo;     /* handler bits 15:0 */
    uint16_t selector;
    uint8_t ist;            /* 0: no IST stack switch */
    uint8_t type_attr;
    uint16_t offset_mid;    /* handler bits 31:16 */
    uint32_t offset_hi;     /* handler bits 63:32 */
    uint32_t reserved;
} __attribute__((packed));

_Static_assert(sizeof(struct idt_gate) == 16, "IDT gate must be 16 bytes");

struct idt_ptr {
    uint16_t limit;
    uint64_t base;
} __attribute__((packed));

/* Register save area built by isr.S, lowest address first. */
struct int_frame {
    uint64_t r15, r14, r13, r12, r11, r10, r9, r8;
    uint64_t rbp, rdi, rsi, rdx, rcx, rbx, rax;
    uint64_t vector;
    uint64_t error_code;    /* 0 for vectors without one */
    /* Pushed by the CPU. */
    uint64_t rip, cs, rflags, rsp, ss;
};

extern const char isr_stubs[];     /* 256 stubs, ISR_STUB_SIZE bytes apart */

static struct idt_gate idt[256] __attribute__((aligned(16)));

volatile uint64_t ticks;

void interrupt_dispatch(struct int_frame *frame);

void idt_init(void)
{
    for (unsigned v = 0; v < 256; v++) {
        uint64_t handler = (uint64_t)(uintptr_t)&isr_stubs[v * ISR_STUB_SIZE];

        idt[v].offset_lo = (uint16_t)handler;
        idt[v].selector = KERNEL_CS;
        idt[v].ist = 0;
        idt[v].type_attr = GATE_INTERRUPT;
        idt[v].offset_mid = (uint16_t)(handler >> 16);
        idt[v].offset_hi = (uint32_t)(handler >> 32);
        idt[v].reserved = 0;
    }

    struct idt_ptr ptr = {
        .limit = sizeof(idt) - 1,
        .base = (uint64_t)(uintptr_t)idt,
    };
    __asm__ volatile("lidt %0" : : "m"(ptr) : "memory");
}

void idt_load_null(void)
{
    struct idt_ptr ptr = {.limit = 0, .base = 0};

    __asm__ volatile("lidt %0" : : "m"(ptr) : "memory");
}

/* Called from isr_common with interrupts disabled (interrupt gates). */
void interrupt_dispatch(struct int_frame *frame)
{
    uint64_t vec = frame->vector;

    if (vec < 32) {
        print("exception %lu rip=%lx\n", vec, frame->rip);
        guest_exit(3);
    }

    if (vec >= IRQ_BASE && vec < IRQ_BASE + 16) {
        unsigned irq = (unsigned)(vec - IRQ_BASE);

        if (irq == IRQ_TIMER)
            ticks++;
        else if (irq == IRQ_COM1)
            serial_irq();
        pic_eoi(irq);
    }
    /* Vectors 0x30-0xff (software interrupts only): ignored. */
}
