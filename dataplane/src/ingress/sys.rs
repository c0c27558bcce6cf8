//! `BPF_OBJ_GET_INFO_BY_FD` on a link for the interface it is attached to, which
//! aya 0.14's `LinkInfo` does not expose. Both link kinds the ingress path pins (XDP
//! and TCX) start their `bpf_link_info` union member with `__u32 ifindex`; a link
//! whose device went away reports 0.

use std::{
    io,
    os::fd::{AsRawFd as _, OwnedFd},
};

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// The ifindex link `fd` is attached to (0: its device is gone).
pub(crate) fn link_ifindex(fd: &OwnedFd) -> io::Result<u32> {
    // struct bpf_link_info: u32 type, id, prog_id; the union starts at offset 16.
    #[repr(C, align(8))]
    struct LinkInfo([u8; 256]);
    #[repr(C, align(8))]
    struct Attr([u8; 128]);
    let mut info = LinkInfo([0; 256]);
    let mut attr = Attr([0; 128]);
    // bpf_attr.info: u32 bpf_fd, u32 info_len, u64 info.
    attr.0[..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    attr.0[4..8].copy_from_slice(&(std::mem::size_of::<LinkInfo>() as u32).to_ne_bytes());
    attr.0[8..16].copy_from_slice(&(&mut info as *mut LinkInfo as u64).to_ne_bytes());
    // SAFETY: `attr` and the buffer it points to are valid and writable for the sizes given.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &mut attr as *mut Attr,
            std::mem::size_of::<Attr>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut ifindex = [0u8; 4];
    ifindex.copy_from_slice(&info.0[16..20]);
    Ok(u32::from_ne_bytes(ifindex))
}
