/* Entry point of every payload: the monitor starts each vCPU here at CPL3 with
 * rdi = its boot-info page (also its FS base) and rsp = its own stack top (16-byte aligned). */
    .section .text.entry, "ax"
    .globl _start
_start:
    call payload_main
    movl %eax, %edi
    call payload_return
1:  jmp 1b
