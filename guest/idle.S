/* hyperfleet-idle: an init that never makes a system call. Under PVM (software virtualization) guest
 * userspace faults on its first syscall and the kernel panics; with this as init the guest kernel stays up
 * (its network answers ping) although nothing runs in userspace. Boot with init=/sbin/hyperfleet-idle. */
    .globl _start
    .text
_start:
    pause
    jmp _start
