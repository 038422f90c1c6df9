/*
 * ftvm test guest: dual 8259A PIC and 8254 PIT.
 */
#include "guest.h"

#define PIC_EOI             0x20    /* OCW2: non-specific EOI */
#define PIT_HZ              1193182u
#define PIT_DIVISOR_100HZ   ((PIT_HZ + 50) / 100)  /* 11932 */

/*
 * Remap IRQ 0-7 to vectors 0x20-0x27 and IRQ 8-15 to 0x28-0x2f, with every
 * IRQ masked.
 */
void pic_init(void)
{
    outb(PORT_PIC1_CMD, 0x11);              /* ICW1: edge, cascade, ICW4 needed */
    outb(PORT_PIC2_CMD, 0x11);
    outb(PORT_PIC1_DATA, IRQ_BASE);         /* ICW2: vector offsets */
    outb(PORT_PIC2_DATA, IRQ_BASE + 8);
    outb(PORT_PIC1_DATA, 0x04);             /* ICW3: slave on master IRQ2 */
    outb(PORT_PIC2_DATA, 0x02);             /* ICW3: slave cascade identity */
    outb(PORT_PIC1_DATA, 0x01);             /* ICW4: 8086 mode, normal EOI */
    outb(PORT_PIC2_DATA, 0x01);
    pic_set_masks(0xff, 0xff);
}

/* OCW1: bit n set = IRQ n (master) / IRQ 8+n (slave) masked. */
void pic_set_masks(uint8_t master, uint8_t slave)
{
    outb(PORT_PIC1_DATA, master);
    outb(PORT_PIC2_DATA, slave);
}

void pic_eoi(unsigned irq)
{
    if (irq >= 8)
        outb(PORT_PIC2_CMD, PIC_EOI);
    outb(PORT_PIC1_CMD, PIC_EOI);
}

/* Channel 0, lobyte/hibyte access, mode 2 (rate generator), 100 Hz. */
void pit_init_100hz(void)
{
    outb(PORT_PIT_CMD, 0x34);
    outb(PORT_PIT_CH0, PIT_DIVISOR_100HZ & 0xff);
    outb(PORT_PIT_CH0, PIT_DIVISOR_100HZ >> 8);
}

/* Latch channel 0 and read its current count. */
uint16_t pit_read_count(void)
{
    outb(PORT_PIT_CMD, 0x00);               /* counter latch, channel 0 */
    uint8_t lo = inb(PORT_PIT_CH0);
    uint8_t hi = inb(PORT_PIT_CH0);
    return (uint16_t)(lo | (hi << 8));
}
