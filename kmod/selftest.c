// SPDX-License-Identifier: GPL-2.0
/*
 * Smoke test of ftvm-rdtsc-exits on a /dev/kvm (run it in the nested harness):
 *
 *   kmod/selftest            prints "rdtsc-exits: present" or "rdtsc-exits: absent"
 *
 * A throwaway VM (one vCPU, real mode) runs RDTSC; RDTSCP; HLT under an MSR filter that
 * denies reads of MSR 0x10, after KVM_CAP_X86_USER_SPACE_MSR(KVM_MSR_EXIT_REASON_FILTER).
 * With the module, both reads exit as KVM_EXIT_X86_RDMSR for 0x10; the test answers
 * 0x1122334455667788 and 0x99aabbccddeeff00 and checks the guest got exactly those (and
 * ECX = TSC_AUX = 7 after RDTSCP). Without it, the guest runs to HLT with no such exit.
 * Exit status 0 either way when the behaviour is consistent, 1 on anything else.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

#define die(...) do { fprintf(stderr, "selftest: " __VA_ARGS__); fputc('\n', stderr); exit(1); } while (0)

int main(void)
{
	/* rdtsc; mov esi,eax; mov edi,edx; rdtscp; hlt  (16-bit code: 66-prefixed moves) */
	static const uint8_t code[] = { 0x0f, 0x31, 0x66, 0x89, 0xc6, 0x66, 0x89, 0xd7,
					0x0f, 0x01, 0xf9, 0xf4 };
	const uint64_t answers[2] = { 0x1122334455667788ull, 0x99aabbccddeeff00ull };
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("/dev/kvm: %s", strerror(errno));
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		die("KVM_CREATE_VM: %s", strerror(errno));
	size_t mem_size = 0x10000;
	uint8_t *mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	memcpy(mem + 0x1000, code, sizeof(code));
	struct kvm_userspace_memory_region region = { .slot = 0, .guest_phys_addr = 0,
		.memory_size = mem_size, .userspace_addr = (uint64_t)(uintptr_t)mem };
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		die("KVM_SET_USER_MEMORY_REGION: %s", strerror(errno));
	struct kvm_enable_cap cap = { .cap = KVM_CAP_X86_USER_SPACE_MSR,
		.args = { KVM_MSR_EXIT_REASON_FILTER } };
	if (ioctl(vm, KVM_ENABLE_CAP, &cap) < 0)
		die("KVM_CAP_X86_USER_SPACE_MSR: %s", strerror(errno));
	uint8_t deny = 0;
	struct kvm_msr_filter filter = { .flags = KVM_MSR_FILTER_DEFAULT_ALLOW };
	filter.ranges[0] = (struct kvm_msr_filter_range){ .flags = KVM_MSR_FILTER_READ,
		.nmsrs = 1, .base = 0x10, .bitmap = &deny };
	if (ioctl(vm, KVM_X86_SET_MSR_FILTER, &filter) < 0)
		die("KVM_X86_SET_MSR_FILTER: %s", strerror(errno));
	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		die("KVM_CREATE_VCPU: %s", strerror(errno));
	/* The guest may run RDTSCP: give it the CPUID bit (8000_0001 EDX 27) KVM supports. */
	struct { struct kvm_cpuid2 h; struct kvm_cpuid_entry2 e[100]; } cpuid = { .h.nent = 100 };
	if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, &cpuid) < 0)
		die("KVM_GET_SUPPORTED_CPUID: %s", strerror(errno));
	if (ioctl(vcpu, KVM_SET_CPUID2, &cpuid) < 0)
		die("KVM_SET_CPUID2: %s", strerror(errno));
	struct { struct kvm_msrs h; struct kvm_msr_entry e[1]; } aux = { .h.nmsrs = 1,
		.e[0] = { .index = 0xc0000103, .data = 7 } };
	if (ioctl(vcpu, KVM_SET_MSRS, &aux) != 1)
		die("KVM_SET_MSRS(TSC_AUX)");
	int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	struct kvm_sregs sregs;
	ioctl(vcpu, KVM_GET_SREGS, &sregs);
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	ioctl(vcpu, KVM_SET_SREGS, &sregs);
	struct kvm_regs regs = { .rip = 0x1000, .rflags = 2 };
	ioctl(vcpu, KVM_SET_REGS, &regs);

	int exits = 0;
	for (;;) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0)
			die("KVM_RUN: %s", strerror(errno));
		if (run->exit_reason == KVM_EXIT_X86_RDMSR) {
			if (run->msr.index != 0x10 || run->msr.reason != KVM_MSR_EXIT_REASON_FILTER || exits >= 2)
				die("unexpected RDMSR exit: index %#x reason %u", run->msr.index, run->msr.reason);
			if (run->msr.data == 0)
				die("msr.data not pre-filled with the guest's TSC");
			run->msr.data = answers[exits++];
			continue;
		}
		if (run->exit_reason == KVM_EXIT_HLT)
			break;
		die("unexpected exit %u", run->exit_reason);
	}
	ioctl(vcpu, KVM_GET_REGS, &regs);
	if (exits == 0) {
		printf("rdtsc-exits: absent\n");
		return 0;
	}
	uint64_t first = (regs.rdi & 0xffffffff) << 32 | (regs.rsi & 0xffffffff);
	uint64_t second = (regs.rdx & 0xffffffff) << 32 | (regs.rax & 0xffffffff);
	if (exits != 2 || first != answers[0] || second != answers[1] || (regs.rcx & 0xffffffff) != 7)
		die("exits %d: guest read %#lx, %#lx, ecx %#lx", exits, (unsigned long)first,
		    (unsigned long)second, (unsigned long)regs.rcx);
	if (regs.rip != 0x1000 + sizeof(code))
		die("rip %#lx after HLT", (unsigned long)regs.rip);
	printf("rdtsc-exits: present (RDTSC and RDTSCP answered by userspace, ECX = TSC_AUX)\n");
	return 0;
}
