/* privcmd through Debian's libxenctrl and by hand: xc_domain_getinfo walks the domains
 * (or fails EPERM for an unprivileged domain), and a HYPERCALL whose buffer is not
 * readable is EFAULT, never a crash.  Prints "domains D1 D2 ..." or "getinfo errno N",
 * then "bad-pointer errno N". */
#define __XEN_TOOLS__ 1
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <xenctrl.h>
#include <xen/sys/privcmd.h>

int main(void)
{
    xc_interface *xc = xc_interface_open(0, 0, 0);
    if (!xc) {
        printf("FAIL xc_interface_open %s\n", strerror(errno));
        return 1;
    }
    xc_dominfo_t info[16];
    int n = xc_domain_getinfo(xc, 0, 16, info);
    if (n < 0) {
        printf("getinfo errno %d\n", errno);
    } else {
        printf("domains");
        for (int i = 0; i < n; i++)
            printf(" %u%s", info[i].domid, info[i].dying ? "d" : "");
        printf("\n");
    }
    int fd = open("/dev/xen/privcmd", O_RDWR);
    privcmd_hypercall_t h = { .op = __HYPERVISOR_domctl, .arg = { 0x10 } };
    int rc = ioctl(fd, IOCTL_PRIVCMD_HYPERCALL, &h);
    printf("bad-pointer errno %d\n", rc < 0 ? errno : 0);
    xc_interface_close(xc);
    return 0;
}
