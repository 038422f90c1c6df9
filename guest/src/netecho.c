/*
 * ftvm test guest: `workload=netecho n=N`, a virtio-net driver (virtio-mmio
 * version 2, split rings, no offloads) that sends back each received frame of
 * EtherType NETECHO_TYPE, IPv4 or IPv6 (addresses swapped too), to its sender,
 * N times, then ends the VM with status 0.
 * Frames of other types (the host's IPv6 chatter) are put back unanswered.
 *
 * Output: "netecho mac=MAC ready" once the card is set up, "frame I len L"
 * for each answered frame (I from 0, L without the virtio header), and
 * "netecho done" at the end. The card is the first virtio-mmio slot (no
 * --disk): 0xd0000000, IRQ 5.
 */
#include "virtio.h"

#define VNET_BASE       VIRTIO_BASE
#define IRQ_VNET        5
#define NETECHO_TYPE    0x88b5      /* IEEE 802 local experimental EtherType 1 */

#define QSIZE           VQ_SIZE
#define BUF_SIZE        2048
#define HDR_LEN         12          /* virtio_net_hdr_v1 */

static struct queue rxq, txq;
static uint8_t rx_buf[QSIZE][BUF_SIZE] __attribute__((aligned(4096)));
static uint8_t tx_buf[QSIZE][BUF_SIZE] __attribute__((aligned(4096)));

static inline uint32_t r32(uint64_t off)
{
    return *(volatile uint32_t *)(uintptr_t)(VNET_BASE + off);
}

static inline void w32(uint64_t off, uint32_t v)
{
    *(volatile uint32_t *)(uintptr_t)(VNET_BASE + off) = v;
}

static inline uint8_t r8(uint64_t off)
{
    return *(volatile uint8_t *)(uintptr_t)(VNET_BASE + off);
}

static void setup_queue(uint32_t index, struct queue *q)
{
    uint64_t d = (uint64_t)(uintptr_t)q->desc;
    uint64_t a = (uint64_t)(uintptr_t)&q->avail;
    uint64_t u = (uint64_t)(uintptr_t)&q->used;

    w32(R_QUEUE_SEL, index);
    w32(R_QUEUE_NUM, QSIZE);
    w32(R_DESC_LO, (uint32_t)d);
    w32(R_DESC_HI, (uint32_t)(d >> 32));
    w32(R_AVAIL_LO, (uint32_t)a);
    w32(R_AVAIL_HI, (uint32_t)(a >> 32));
    w32(R_USED_LO, (uint32_t)u);
    w32(R_USED_HI, (uint32_t)(u >> 32));
    w32(R_QUEUE_READY, 1);
}

/* Makes receive buffer `id` available again. */
static void post_rx(uint16_t id)
{
    rxq.avail.ring[rxq.avail.idx % QSIZE] = id;
    barrier();
    rxq.avail.idx++;
    barrier();
}

void workload_netecho(uint64_t n)
{
    if (r32(R_MAGIC) != 0x74726976 || r32(R_VERSION) != 2 || r32(R_DEVICE_ID) != 1) {
        print("netecho: no virtio-net card at %lx\n", VNET_BASE);
        guest_exit(4);
    }
    w32(R_STATUS, 0);
    w32(R_STATUS, S_ACK | S_DRIVER);
    w32(R_DRV_FEAT_SEL, 0);
    w32(R_DRV_FEAT, 1u << 5);           /* VIRTIO_NET_F_MAC */
    w32(R_DRV_FEAT_SEL, 1);
    w32(R_DRV_FEAT, 1);                 /* VIRTIO_F_VERSION_1 */
    w32(R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    if (!(r32(R_STATUS) & S_FEATURES_OK)) {
        print("netecho: features refused\n");
        guest_exit(4);
    }
    setup_queue(0, &rxq);
    setup_queue(1, &txq);

    uint8_t mac[6];
    for (int i = 0; i < 6; i++)
        mac[i] = r8(R_CONFIG + i);

    for (uint16_t i = 0; i < QSIZE; i++) {
        rxq.desc[i].addr = (uint64_t)(uintptr_t)rx_buf[i];
        rxq.desc[i].len = BUF_SIZE;
        rxq.desc[i].flags = F_WRITE;
        post_rx(i);
    }
    w32(R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    w32(R_QUEUE_NOTIFY, 0);

    print("netecho mac=%x:%x:%x:%x:%x:%x ready\n", mac[0], mac[1], mac[2], mac[3],
          mac[4], mac[5]);
    pic_set_masks((uint8_t)~(1u << IRQ_VNET), 0xff);

    uint16_t rx_seen = 0;
    uint64_t answered = 0;
    while (answered < n) {
        cli();
        barrier();
        if (rxq.used.idx == rx_seen) {
            /* sti; hlt: the interrupt cannot slip in between the two. */
            __asm__ volatile("sti; hlt" : : : "memory");
            continue;
        }
        sti();
        w32(R_INT_ACK, r32(R_INT_STATUS));
        struct used_elem e = rxq.used.ring[rx_seen % QSIZE];
        rx_seen++;
        uint16_t id = (uint16_t)(e.id % QSIZE);
        uint8_t *frame = rx_buf[id] + HDR_LEN;
        uint32_t len = e.len > HDR_LEN ? e.len - HDR_LEN : 0;
        uint16_t type = len >= 14 ? (uint16_t)(frame[12] << 8 | frame[13]) : 0;

        bool ipv4 = type == 0x0800 && len >= 34;
        bool ipv6 = type == 0x86dd && len >= 54;

        if ((type == NETECHO_TYPE || ipv4 || ipv6) && len <= BUF_SIZE - HDR_LEN) {
            print("frame %lu len %u\n", answered, len);
            uint16_t t = (uint16_t)(answered % QSIZE);
            uint8_t *out = tx_buf[t];
            memset(out, 0, HDR_LEN);
            memcpy(out + HDR_LEN, frame + 6, 6);        /* back to the sender */
            memcpy(out + HDR_LEN + 6, mac, 6);
            memcpy(out + HDR_LEN + 12, frame + 12, len - 12);
            if (ipv4) {
                /* Back to the sender's address, from the one it wrote to (the IPv4
                 * header checksum is a sum: swapping two words keeps it right). */
                memcpy(out + HDR_LEN + 26, frame + 30, 4);
                memcpy(out + HDR_LEN + 30, frame + 26, 4);
            }
            if (ipv6) {
                /* Likewise the IPv6 addresses (upper-layer checksums sum them too). */
                memcpy(out + HDR_LEN + 22, frame + 38, 16);
                memcpy(out + HDR_LEN + 38, frame + 22, 16);
            }
            txq.desc[t].addr = (uint64_t)(uintptr_t)out;
            txq.desc[t].len = HDR_LEN + len;
            txq.desc[t].flags = 0;
            txq.avail.ring[txq.avail.idx % QSIZE] = t;
            barrier();
            txq.avail.idx++;
            barrier();
            w32(R_QUEUE_NOTIFY, 1);
            answered++;
        }
        post_rx(id);
        w32(R_QUEUE_NOTIFY, 0);
    }
    print("netecho done\n");
    guest_exit(0);
}
