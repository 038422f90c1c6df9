/*
 * ftvm test guest: entry point.
 *
 * Entered like a Linux vmlinux through the 64-bit boot protocol: long mode,
 * paging on with the low 4 GiB identity mapped, CS = 0x10, DS/ES/SS = 0x18,
 * IF = 0, RSI = physical address of the boot_params zero page.
 */

    .section .text.start, "ax"
    .code64
    .globl _start
    .type _start, @function
_start:
    cli
    cld
    movq    %rsi, %r12              /* boot_params; callee-saved across calls */

    /* Zero .bss (it holds our stack too, which is not in use yet). Both ends are
       16-byte aligned (guest.ld); 8 bytes per iteration because a non-PVM-aware guest's
       string instructions are emulated one iteration at a time. */
    leaq    __bss_start(%rip), %rdi
    leaq    __bss_end(%rip), %rcx
    subq    %rdi, %rcx
    shrq    $3, %rcx
    xorl    %eax, %eax
    rep stosq

    /* Own stack, 16-byte aligned, so guest_main sees the SysV ABI alignment. */
    leaq    boot_stack_top(%rip), %rsp
    xorl    %ebp, %ebp              /* terminate frame-pointer chains */

    movq    %r12, %rdi
    call    guest_main

    /* guest_main must not return; if it does, that is a failure. */
    movl    $1, %edi
    call    guest_exit
1:  cli
    hlt
    jmp     1b
    .size _start, . - _start

    .section .bss
    .balign 16
boot_stack:
    .skip   65536
boot_stack_top:

    .section .note.GNU-stack, "", @progbits
