/*
 * ftvm test guest: interrupt entry stubs.
 *
 * isr_stubs is an array of 256 stubs, ISR_STUB_SIZE (16) bytes apart: stub v
 * handles vector v. Each pushes a dummy error code (unless the CPU pushed a
 * real one), then the vector number, and jumps to isr_common, which saves the
 * general-purpose registers and calls
 *
 *     void interrupt_dispatch(struct int_frame *frame);
 *
 * The C code is built with -mgeneral-regs-only, so no FPU/SSE state needs
 * saving. The layout pushed here must match struct int_frame in idt.c.
 */

    .text
    .code64

    .balign 16
    .globl isr_stubs
isr_stubs:
    .set .Lvec, 0
    .rept 256
1:
    /* Exceptions that push an error code: #DF #TS #NP #SS #GP #PF #AC #CP #VC #SX */
    .if (.Lvec == 8) || (.Lvec >= 10 && .Lvec <= 14) || (.Lvec == 17) || (.Lvec == 21) || (.Lvec == 29) || (.Lvec == 30)
    .else
    pushq   $0                      /* dummy error code */
    .endif
    pushq   $.Lvec
    jmp     isr_common
    .org    1b + 16, 0xcc           /* exactly 16 bytes (error if larger) */
    .set .Lvec, .Lvec + 1
    .endr

isr_common:
    /* Stack now: [vector, error code, RIP, CS, RFLAGS, RSP, SS]. */
    pushq   %rax
    pushq   %rbx
    pushq   %rcx
    pushq   %rdx
    pushq   %rsi
    pushq   %rdi
    pushq   %rbp
    pushq   %r8
    pushq   %r9
    pushq   %r10
    pushq   %r11
    pushq   %r12
    pushq   %r13
    pushq   %r14
    pushq   %r15
    cld                             /* SysV: DF clear on function entry */
    movq    %rsp, %rdi              /* struct int_frame * */
    movq    %rsp, %rbx              /* callee-saved: original RSP */
    andq    $-16, %rsp              /* 16-byte alignment at the call */
    call    interrupt_dispatch
    movq    %rbx, %rsp
    popq    %r15
    popq    %r14
    popq    %r13
    popq    %r12
    popq    %r11
    popq    %r10
    popq    %r9
    popq    %r8
    popq    %rbp
    popq    %rdi
    popq    %rsi
    popq    %rdx
    popq    %rcx
    popq    %rbx
    popq    %rax
    addq    $16, %rsp               /* drop vector and error code */
    iretq

    .section .note.GNU-stack, "", @progbits
