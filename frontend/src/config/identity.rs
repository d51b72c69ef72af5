//! `user` and `group` of a pool, resolved to ids when the config is checked.

use std::ffi::CString;

/// A uid from a user name or number.
pub fn uid(name: &str) -> Result<(u32, u32), String> {
    let c = CString::new(name).map_err(|_| format!("`{name}` is not a user name"))?;
    let mut buf = vec![0u8; 16384];
    // SAFETY: passwd is plain data; getpwnam_r writes into `pwd` and `buf`, which outlive the call.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        let r = libc::getpwnam_r(
            c.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut out,
        );
        if r == 0 && !out.is_null() {
            return Ok((pwd.pw_uid, pwd.pw_gid));
        }
    }
    match name.parse::<u32>() {
        Ok(n) => Ok((n, n)),
        Err(_) => Err(format!("no user `{name}` on this system")),
    }
}

/// A gid from a group name or number.
pub fn gid(name: &str) -> Result<u32, String> {
    let c = CString::new(name).map_err(|_| format!("`{name}` is not a group name"))?;
    let mut buf = vec![0u8; 16384];
    // SAFETY: group is plain data; getgrnam_r writes into `grp` and `buf`, which outlive the call.
    unsafe {
        let mut grp: libc::group = std::mem::zeroed();
        let mut out: *mut libc::group = std::ptr::null_mut();
        let r = libc::getgrnam_r(
            c.as_ptr(),
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut out,
        );
        if r == 0 && !out.is_null() {
            return Ok(grp.gr_gid);
        }
    }
    name.parse::<u32>()
        .map_err(|_| format!("no group `{name}` on this system"))
}
