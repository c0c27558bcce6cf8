//! The two bpf(2) commands aya 0.14 does not expose: opening a pinned object as a
//! plain descriptor and `BPF_LINK_DETACH`; and the calling thread's network namespace
//! cookie (`SO_NETNS_COOKIE`, which neither nix nor socket2 wraps). Dropping a link's last reference (fd or
//! pin) detaches it only later, from a kernel work queue; cleanup and link
//! replacement must be done when they return, so they detach explicitly.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `union bpf_attr`, large enough for every command used here, zero-filled as the
/// kernel requires for unused fields.
#[repr(C, align(8))]
struct Attr([u8; 128]);

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, writable buffer of the size passed.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut Attr, std::mem::size_of::<Attr>()) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Opens the object pinned at `path`.
pub(crate) fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = Attr([0; 128]);
    // bpf_attr.obj_get: u64 pathname at offset 0.
    attr.0[..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Detaches the link pinned at `path` now (its pin stays until removed).
pub(crate) fn detach_pinned_link(path: &Path) -> io::Result<()> {
    link_detach(&obj_get(path)?)
}

/// Detaches the link `fd` refers to now.
pub(crate) fn link_detach(fd: &OwnedFd) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let mut attr = Attr([0; 128]);
    // bpf_attr.link_detach: u32 link_fd at offset 0.
    attr.0[..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    bpf(BPF_LINK_DETACH, &mut attr).map(|_| ())
}

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// The cgroup id (the cgroup2 directory's inode number) a cgroup link `fd` is attached
/// to. aya 0.14's `LinkInfo` does not expose it.
pub(crate) fn link_cgroup_id(fd: &OwnedFd) -> io::Result<u64> {
    use std::os::fd::AsRawFd as _;
    // struct bpf_link_info: u32 type, id, prog_id; then the union at offset 16, whose
    // `cgroup` member starts with u64 cgroup_id.
    #[repr(C, align(8))]
    struct LinkInfo([u8; 256]);
    let mut info = LinkInfo([0; 256]);
    let mut attr = Attr([0; 128]);
    attr.0[..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    attr.0[4..8].copy_from_slice(&(std::mem::size_of::<LinkInfo>() as u32).to_ne_bytes());
    attr.0[8..16].copy_from_slice(&(&mut info as *mut LinkInfo as u64).to_ne_bytes());
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let mut id = [0u8; 8];
    id.copy_from_slice(&info.0[16..24]);
    Ok(u64::from_ne_bytes(id))
}

/// The cookie of the calling thread's network namespace, as `bpf_get_netns_cookie`
/// returns it for sockets there (Linux 5.14+ for `SO_NETNS_COOKIE`).
pub(crate) fn own_netns_cookie() -> io::Result<u64> {
    use std::os::fd::AsRawFd as _;
    // Any socket will do: the option reports the namespace it was created in.
    let socket = std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .or_else(|_| std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0)))?;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes passed.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}
