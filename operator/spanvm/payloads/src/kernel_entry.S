/* 64-bit entry of spanvm's own ring-0 test kernels, entered through the Linux 64-bit boot
 * protocol (boot.rst "64-bit Boot Protocol"): long mode, CPL0, paging on, interrupts off,
 * rsi = the zero page. Calls kernel_main(zero page, entry CS, entry RFLAGS) on its own stack
 * and ends the VM with its return value through isa-debug-exit (outl to port 0xf4). */
    .section .text.entry, "ax"
    .globl _start
_start:
    pushfq
    popq %rdx                  /* rflags as the loader left them */
    movq %rsi, %rdi            /* the zero page */
    movq %cs, %rsi
    leaq stack_top(%rip), %rsp
    call kernel_main
    movw $0xf4, %dx
    outl %eax, %dx
1:  hlt
    jmp 1b

    .section .bss
    .balign 16
    .space 8192
stack_top:
