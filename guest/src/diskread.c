/*
 * ftvm test guest: `workload=diskread n=P [wait=1] [sum=0]`, a virtio-blk
 * driver (virtio-mmio version 2, one split ring, no optional features) that
 * reads the whole first disk P times (default 1) in 64 KiB requests and prints
 * a checksum of each. With `wait=1`, before every pass but the first it prints
 * "diskread wait" and waits for one byte on COM1 (so a test can act between
 * passes). With `sum=0` it reads without summing or printing per request (a
 * benchmark of the device path: guest code is slow on PVM); "pass" lines then
 * show the FNV offset.
 *
 * Output: "diskread sectors=S" (the capacity), then per request
 * "read sector <dec> sum=<hex>" (FNV-1a 64 over the 64-bit little-endian
 * words read), per pass "pass <dec> sum=<hex>" (FNV-1a 64 over the request
 * sums, in order), and "diskread done".
 * Exit 0; 4 when slot 0 holds no block device or a request fails.
 * The disk is the first virtio-mmio slot: 0xd0000000. The data buffer is the
 * 64 KiB at DISK_BUF (4 MiB), the request header and status byte the page
 * below it; completion is polled (the device completes a request inside the
 * QueueNotify write), so no interrupt is used.
 */
#include "virtio.h"

#define VBLK            VIRTIO_BASE
#define CHUNK           0x10000ul
#define DISK_BUF        0x400000ul
#define REQ_PAGE        (DISK_BUF - 0x1000ul)
#define T_IN            0
#define FNV_OFFSET      0xcbf29ce484222325ull
#define FNV_PRIME       0x100000001b3ull

static struct queue q;

struct req_header {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
};

/* FNV-1a over 64-bit little-endian words (a request is whole sectors): a
 * loop of few iterations, since guest code runs slowly on PVM (the test guest
 * measured 3 us per iteration there). */
static uint64_t fnv64(uint64_t h, const uint64_t *p, uint64_t words)
{
    for (uint64_t i = 0; i < words; i++) {
        h ^= p[i];
        h *= FNV_PRIME;
    }
    return h;
}

/* Reads `len` bytes from `sector` into DISK_BUF; false when the request fails. */
static bool read_chunk(uint64_t sector, uint32_t len)
{
    volatile struct req_header *h = (volatile struct req_header *)(uintptr_t)REQ_PAGE;
    volatile uint8_t *status = (volatile uint8_t *)(uintptr_t)(REQ_PAGE + 0x100);

    h->type = T_IN;
    h->reserved = 0;
    h->sector = sector;
    *status = 0xff;
    q.desc[0] = (struct desc){REQ_PAGE, sizeof(struct req_header), F_NEXT, 1};
    q.desc[1] = (struct desc){DISK_BUF, len, F_NEXT | F_WRITE, 2};
    q.desc[2] = (struct desc){REQ_PAGE + 0x100, 1, F_WRITE, 0};
    uint16_t seen = q.used.idx;
    q.avail.ring[q.avail.idx % VQ_SIZE] = 0;
    barrier();
    q.avail.idx++;
    barrier();
    vio_w32(VBLK, R_QUEUE_NOTIFY, 0);
    barrier();
    return q.used.idx != seen && *status == 0;
}

void workload_diskread(uint64_t passes, bool sum_data, bool wait)
{
    if (vio_r32(VBLK, R_MAGIC) != 0x74726976 || vio_r32(VBLK, R_VERSION) != 2 ||
        vio_r32(VBLK, R_DEVICE_ID) != 2) {
        print("diskread: no virtio-blk device at %lx\n", VBLK);
        guest_exit(4);
    }
    vio_w32(VBLK, R_STATUS, 0);
    vio_w32(VBLK, R_STATUS, S_ACK | S_DRIVER);
    vio_w32(VBLK, R_DRV_FEAT_SEL, 0);
    vio_w32(VBLK, R_DRV_FEAT, 0);
    vio_w32(VBLK, R_DRV_FEAT_SEL, 1);
    vio_w32(VBLK, R_DRV_FEAT, 1);           /* VIRTIO_F_VERSION_1 */
    vio_w32(VBLK, R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    if (!(vio_r32(VBLK, R_STATUS) & S_FEATURES_OK)) {
        print("diskread: features refused\n");
        guest_exit(4);
    }
    uint64_t d = (uint64_t)(uintptr_t)q.desc;
    uint64_t a = (uint64_t)(uintptr_t)&q.avail;
    uint64_t u = (uint64_t)(uintptr_t)&q.used;
    vio_w32(VBLK, R_QUEUE_SEL, 0);
    vio_w32(VBLK, R_QUEUE_NUM, VQ_SIZE);
    vio_w32(VBLK, R_DESC_LO, (uint32_t)d);
    vio_w32(VBLK, R_DESC_HI, (uint32_t)(d >> 32));
    vio_w32(VBLK, R_AVAIL_LO, (uint32_t)a);
    vio_w32(VBLK, R_AVAIL_HI, (uint32_t)(a >> 32));
    vio_w32(VBLK, R_USED_LO, (uint32_t)u);
    vio_w32(VBLK, R_USED_HI, (uint32_t)(u >> 32));
    vio_w32(VBLK, R_QUEUE_READY, 1);
    vio_w32(VBLK, R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);

    uint64_t sectors = (uint64_t)vio_r32(VBLK, R_CONFIG) |
                       (uint64_t)vio_r32(VBLK, R_CONFIG + 4) << 32;
    print("diskread sectors=%lu\n", sectors);
    if (passes == 0)
        passes = 1;
    for (uint64_t pass = 1; pass <= passes; pass++) {
        if (pass > 1 && wait) {
            print("diskread wait\n");
            cli();
            pic_set_masks((uint8_t)~(1u << IRQ_COM1), 0xff);
            serial_enable_rx_irq();
            sti();
            serial_getc();
            cli();
        }
        uint64_t whole = FNV_OFFSET;
        for (uint64_t s = 0; s < sectors; s += CHUNK / 512) {
            uint64_t left = (sectors - s) * 512;
            uint32_t len = (uint32_t)(left < CHUNK ? left : CHUNK);
            if (!read_chunk(s, len)) {
                print("diskread: reading sector %lu failed\n", s);
                guest_exit(4);
            }
            if (!sum_data)
                continue;
            const uint64_t *buf = (const uint64_t *)(uintptr_t)DISK_BUF;
            uint64_t sum = fnv64(FNV_OFFSET, buf, len / 8);
            print("read sector %lu sum=%lx\n", s, sum);
            whole = fnv64(whole, &sum, 1);
        }
        print("pass %lu sum=%lx\n", pass, whole);
    }
    print("diskread done\n");
    guest_exit(0);
}
