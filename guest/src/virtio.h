/*
 * ftvm test guest: what its virtio-mmio drivers share (virtio 1.2, 4.2.2:
 * "version 2" registers; split rings of VQ_SIZE entries).
 */
#ifndef FTVM_GUEST_VIRTIO_H
#define FTVM_GUEST_VIRTIO_H

#include "guest.h"

/* Where the virtio-mmio slots are: slot i at VIRTIO_BASE + i * 0x1000. */
#define VIRTIO_BASE     0xd0000000ul

/* virtio-mmio registers. */
#define R_MAGIC         0x000
#define R_VERSION       0x004
#define R_DEVICE_ID     0x008
#define R_DRV_FEAT      0x020
#define R_DRV_FEAT_SEL  0x024
#define R_QUEUE_SEL     0x030
#define R_QUEUE_NUM     0x038
#define R_QUEUE_READY   0x044
#define R_QUEUE_NOTIFY  0x050
#define R_INT_STATUS    0x060
#define R_INT_ACK       0x064
#define R_STATUS        0x070
#define R_DESC_LO       0x080
#define R_DESC_HI       0x084
#define R_AVAIL_LO      0x090
#define R_AVAIL_HI      0x094
#define R_USED_LO       0x0a0
#define R_USED_HI       0x0a4
#define R_CONFIG        0x100

/* Device status bits. */
#define S_ACK           1
#define S_DRIVER        2
#define S_DRIVER_OK     4
#define S_FEATURES_OK   8

/* Descriptor flags. */
#define F_NEXT          1
#define F_WRITE         2

#define VQ_SIZE         16

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[VQ_SIZE];
};

struct used_elem {
    uint32_t id;
    uint32_t len;
};

struct used {
    uint16_t flags;
    uint16_t idx;
    struct used_elem ring[VQ_SIZE];
};

struct queue {
    struct desc desc[VQ_SIZE] __attribute__((aligned(4096)));
    struct avail avail __attribute__((aligned(4096)));
    struct used used __attribute__((aligned(4096)));
};

static inline void barrier(void) { __asm__ volatile("" : : : "memory"); }

static inline uint32_t vio_r32(uint64_t base, uint64_t off)
{
    return *(volatile uint32_t *)(uintptr_t)(base + off);
}

static inline void vio_w32(uint64_t base, uint64_t off, uint32_t v)
{
    *(volatile uint32_t *)(uintptr_t)(base + off) = v;
}

#endif /* FTVM_GUEST_VIRTIO_H */
