//! ICMP echo from the host (raw socket, root): the "can the host reach the guest" check of `doctor` and
//! `GET /machines/{id}/network`, without depending on a `ping` binary being installed.

use std::io;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The fold leaves at most 16 bits set, so the low half is the whole sum.
    !low_u16(sum)
}

/// The low 16 bits of `x` (what `x as u16` would give).
fn low_u16(x: u32) -> u16 {
    let [_, _, hi, lo] = x.to_be_bytes();
    u16::from_be_bytes([hi, lo])
}

/// `size_of::<T>()` as a `socklen_t`, for the sockaddr/option structs passed to the kernel.
fn socklen<T>() -> io::Result<libc::socklen_t> {
    libc::socklen_t::try_from(std::mem::size_of::<T>())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "struct size does not fit socklen_t"))
}

struct Fd(i32);
impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: closing a descriptor we own exactly once.
        unsafe { libc::close(self.0) };
    }
}

/// Sends one echo request to `target` and waits up to `timeout` for the matching reply.
/// Returns the round-trip time, `Ok(None)` on timeout.
pub async fn ping(target: Ipv4Addr, timeout: Duration) -> io::Result<Option<Duration>> {
    crate::blocking(move || ping_blocking(target, timeout)).await
}

/// The raw socket waits with SO_RCVTIMEO, so this holds its thread for up to `timeout`.
fn ping_blocking(target: Ipv4Addr, timeout: Duration) -> io::Result<Option<Duration>> {
    // SAFETY: plain socket syscall; the fd is owned by `Fd` and closed on every path.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_ICMP) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = Fd(fd);
    let ident = low_u16(std::process::id()) ^ 0x4846;
    let seq: u16 = rand_seq();
    let mut pkt = [0u8; 24];
    pkt[0] = 8; // echo request
    pkt[4..6].copy_from_slice(&ident.to_be_bytes());
    pkt[6..8].copy_from_slice(&seq.to_be_bytes());
    pkt[8..24].copy_from_slice(b"hyperfleet-ping!");
    let sum = checksum(&pkt);
    pkt[2..4].copy_from_slice(&sum.to_be_bytes());
    let sin_family = libc::sa_family_t::try_from(libc::AF_INET)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "AF_INET does not fit sa_family_t"))?;
    let addr_len = socklen::<libc::sockaddr_in>()?;
    let addr = libc::sockaddr_in {
        sin_family,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(target).to_be() },
        sin_zero: [0; 8],
    };
    let start = Instant::now();
    // SAFETY: pkt and addr are valid for the given lengths.
    let sent = unsafe {
        libc::sendto(fd.0, pkt.as_ptr().cast(), pkt.len(), 0, (&addr as *const libc::sockaddr_in).cast(), addr_len)
    };
    if sent < 0 {
        let e = io::Error::last_os_error();
        // No route (e.g. the subnet's unreachable route): the guest is not reachable.
        if matches!(e.raw_os_error(), Some(libc::EHOSTUNREACH) | Some(libc::ENETUNREACH) | Some(libc::EPERM)) {
            return Ok(None);
        }
        return Err(e);
    }
    let tv_len = socklen::<libc::timeval>()?;
    let mut buf = [0u8; 1500];
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Ok(None);
        }
        let tv = libc::timeval {
            // `left` is at most `timeout`; a timeout beyond `time_t` is waited as the longest one it can hold.
            tv_sec: libc::time_t::try_from(left.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_usec: left.subsec_micros().max(1) as libc::suseconds_t,
        };
        // SAFETY: tv is a valid timeval for the duration of the call.
        unsafe {
            libc::setsockopt(fd.0, libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&tv as *const libc::timeval).cast(), tv_len)
        };
        // SAFETY: sockaddr_in is a plain C struct of integers, for which all-zero bytes are a valid value.
        let mut from: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut from_len = addr_len;
        // SAFETY: buf and from are valid writable buffers of the given sizes.
        let n = unsafe {
            libc::recvfrom(
                fd.0,
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_in).cast(),
                &mut from_len,
            )
        };
        // Negative (-1) is an error; anything else is a length that fits usize.
        let Ok(n) = usize::try_from(n) else {
            let e = io::Error::last_os_error();
            if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted) {
                continue;
            }
            return Err(e);
        };
        let data = &buf[..n];
        let ihl = usize::from(data.first().map_or(0, |b| b & 0x0f)) * 4;
        let Some(icmp) = data.get(ihl..) else {
            continue;
        };
        let from_ip = Ipv4Addr::from(u32::from_be(from.sin_addr.s_addr));
        if icmp.len() >= 8
            && icmp[0] == 0
            && from_ip == target
            && icmp[4..6] == ident.to_be_bytes()
            && icmp[6..8] == seq.to_be_bytes()
        {
            return Ok(Some(start.elapsed()));
        }
    }
}

fn rand_seq() -> u16 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| low_u16(d.subsec_nanos())).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_a_known_packet() {
        // Echo request, id 1, seq 1, no payload: checksum 0xf7fd.
        assert_eq!(checksum(&[8, 0, 0, 0, 0, 1, 0, 1]), 0xf7fd);
    }

    #[tokio::test]
    #[ignore = "needs root: a raw ICMP socket"]
    async fn loopback_answers() {
        let rtt = ping(Ipv4Addr::LOCALHOST, Duration::from_secs(2)).await.unwrap();
        assert!(rtt.is_some(), "127.0.0.1 did not answer");
    }
}
