/*
 * ftvm test guest: COM1 (8250/16550 UART) output, RX ring buffer, print().
 */
#include <stdarg.h>

#include "guest.h"

#define UART_RBR    (PORT_COM1 + 0)     /* read: receive buffer (DLAB=0) */
#define UART_THR    (PORT_COM1 + 0)     /* write: transmit holding (DLAB=0) */
#define UART_DLL    (PORT_COM1 + 0)     /* divisor latch low (DLAB=1) */
#define UART_IER    (PORT_COM1 + 1)     /* interrupt enable (DLAB=0) */
#define UART_DLM    (PORT_COM1 + 1)     /* divisor latch high (DLAB=1) */
#define UART_IIR    (PORT_COM1 + 2)     /* read: interrupt identification */
#define UART_FCR    (PORT_COM1 + 2)     /* write: FIFO control */
#define UART_LCR    (PORT_COM1 + 3)
#define UART_MCR    (PORT_COM1 + 4)
#define UART_LSR    (PORT_COM1 + 5)

#define LSR_DR      0x01                /* receive data ready */
#define LSR_THRE    0x20                /* transmit holding register empty */
#define IER_ERBFI   0x01                /* received-data-available interrupt */

/*
 * Single-producer (IRQ4 handler) / single-consumer (main loop) ring buffer.
 * The indices run freely and wrap at 2^32; RX_SIZE must be a power of two.
 */
#define RX_SIZE 256
static volatile uint8_t rx_buf[RX_SIZE];
static volatile uint32_t rx_head;       /* written by the IRQ handler only */
static volatile uint32_t rx_tail;       /* written by the consumer only */
static volatile bool rx_stalled;        /* ring was full: bytes may wait in the UART */

void serial_init(void)
{
    outb(UART_IER, 0x00);       /* no interrupts */
    outb(UART_LCR, 0x80);       /* DLAB on */
    outb(UART_DLL, 0x01);       /* divisor 1: 115200 baud */
    outb(UART_DLM, 0x00);
    outb(UART_LCR, 0x03);       /* DLAB off, 8N1 */
    outb(UART_FCR, 0xc7);       /* enable + clear FIFOs, 14-byte trigger */
    outb(UART_MCR, 0x0b);       /* DTR, RTS, OUT2 (IRQ line enable) */
}

void serial_putc(char c)
{
    while (!(inb(UART_LSR) & LSR_THRE))
        ;
    outb(UART_THR, (uint8_t)c);
}

void serial_puts(const char *s)
{
    while (*s)
        serial_putc(*s++);
}

static void put_unsigned(uint64_t v, unsigned base)
{
    char buf[20];               /* 2^64 - 1 has 20 decimal digits */
    int n = 0;

    do {
        buf[n++] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v);
    while (n)
        serial_putc(buf[--n]);
}

void print(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            serial_putc(*fmt);
            continue;
        }
        bool is_long = false;
        if (*++fmt == 'l') {
            is_long = true;
            fmt++;
        }
        switch (*fmt) {
        case 's':
            serial_puts(va_arg(ap, const char *));
            break;
        case 'c':
            serial_putc((char)va_arg(ap, int));
            break;
        case 'd': {
            int64_t v = is_long ? va_arg(ap, long) : va_arg(ap, int);
            if (v < 0) {
                serial_putc('-');
                put_unsigned(-(uint64_t)v, 10);
            } else {
                put_unsigned((uint64_t)v, 10);
            }
            break;
        }
        case 'u':
        case 'x':
            put_unsigned(is_long ? va_arg(ap, unsigned long) : va_arg(ap, unsigned int),
                         *fmt == 'u' ? 10 : 16);
            break;
        case '%':
            serial_putc('%');
            break;
        case '\0':              /* stray '%' at the end */
            fmt--;
            break;
        default:                /* unsupported: print it verbatim */
            serial_putc('%');
            serial_putc(*fmt);
            break;
        }
    }
    va_end(ap);
}

/*
 * Move received bytes from the UART into the ring. When the ring is full the
 * rest stay in the UART (flow control instead of loss); serial_getc() polls
 * them out once it has made room.
 */
static void rx_drain(void)
{
    uint32_t head = rx_head;

    while (head - rx_tail < RX_SIZE && (inb(UART_LSR) & LSR_DR)) {
        rx_buf[head % RX_SIZE] = inb(UART_RBR);
        rx_head = ++head;
    }
    rx_stalled = head - rx_tail == RX_SIZE;
}

/*
 * Turn on the RX interrupt. Call with interrupts disabled; bytes that arrived
 * before this point are drained into the ring by polling, so none are lost
 * even if the UART model does not raise an interrupt for them.
 */
void serial_enable_rx_irq(void)
{
    outb(UART_IER, IER_ERBFI);
    rx_drain();
}

/* IRQ4: read IIR once (acknowledges the interrupt), then drain the FIFO. */
void serial_irq(void)
{
    (void)inb(UART_IIR);
    rx_drain();
}

/*
 * Next received byte, waiting for the RX interrupt if there is none.
 * Returns with interrupts enabled. The emptiness check runs with interrupts
 * off, and `sti; hlt` are adjacent in one asm statement: sti takes effect
 * only after the next instruction, so an interrupt arriving after the check
 * still wakes the hlt instead of being missed.
 */
int serial_getc(void)
{
    for (;;) {
        cli();
        if (rx_stalled && rx_head == rx_tail)
            rx_drain();         /* fetch what a full ring left in the UART */
        uint32_t tail = rx_tail;
        if (rx_head != tail) {
            uint8_t c = rx_buf[tail % RX_SIZE];
            rx_tail = tail + 1;
            sti();
            return c;
        }
        __asm__ volatile("sti; hlt" : : : "memory");
    }
}
