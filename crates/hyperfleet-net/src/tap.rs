//! Creates persistent TAP devices with the TUN driver's ioctls (TUNSETIFF + TUNSETPERSIST), the one thing
//! rtnetlink cannot do. Firecracker later opens the device by name; deleting goes through netlink.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

use crate::NetError;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates the TAP `name` so that it outlives this process (flags as Firecracker opens it). Blocking: the
/// ioctls wait for the kernel's rtnl lock.
pub(crate) async fn create_persistent(name: &str) -> Result<(), NetError> {
    let name = name.to_string();
    crate::blocking(move || create_persistent_blocking(&name)).await
}

fn create_persistent_blocking(name: &str) -> Result<(), NetError> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(NetError::Tap(format!("interface name '{name}' must be 1-15 bytes")));
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| NetError::Tap(format!("open /dev/net/tun: {e} (is the tun module loaded, are we root?)")))?;
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `req` is a properly sized, initialised ifreq that outlives both calls; the fd is open.
    unsafe {
        if libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req) < 0 {
            return Err(NetError::Tap(format!("create TAP {name}: {}", std::io::Error::last_os_error())));
        }
        if libc::ioctl(tun.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) < 0 {
            return Err(NetError::Tap(format!("make TAP {name} persistent: {}", std::io::Error::last_os_error())));
        }
    }
    Ok(())
}
