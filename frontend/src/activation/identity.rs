//! The identity of a pool that names no `user`: a uid of its own, as IIS's
//! ApplicationPoolIdentity gives every pool, allocated the way systemd's `DynamicUser=` does
//! from the range 61184–65519. A pool keeps its uid while the front end runs (its id is never
//! reused), and two pools never share one, so no pool's workers can signal, trace or take the
//! fds of another pool's. A uid that `/etc/passwd` names is skipped.

/// systemd's range for dynamic users.
const FIRST: u32 = 61184;
const LAST: u32 = 65519;

/// The uid (and gid) of pool `id`'s workers.
pub fn dynamic(id: usize) -> u32 {
    let mut taken = 0;
    let mut uid = FIRST;
    while uid <= LAST {
        if !named(uid) {
            if taken == id {
                return uid;
            }
            taken += 1;
        }
        uid += 1;
    }
    // 64 pools at most (`MAX_POOLS`) fit with room to spare; this is never reached.
    LAST
}

/// Whether the system's user or group database names `id` (it is used as both).
fn named(id: u32) -> bool {
    let mut buf = vec![0u8; 4096];
    // SAFETY: passwd and group are plain data; getpwuid_r and getgrgid_r write into them and
    // `buf`, which outlive the calls.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        let r = libc::getpwuid_r(id, &mut pwd, buf.as_mut_ptr().cast(), buf.len(), &mut out);
        if r == 0 && !out.is_null() {
            return true;
        }
        let mut grp: libc::group = std::mem::zeroed();
        let mut gout: *mut libc::group = std::ptr::null_mut();
        let r = libc::getgrgid_r(id, &mut grp, buf.as_mut_ptr().cast(), buf.len(), &mut gout);
        r == 0 && !gout.is_null()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pool_gets_a_uid_of_its_own_in_the_dynamic_range() {
        let uids: Vec<u32> = (0..64).map(dynamic).collect();
        let mut unique = uids.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), 64);
        assert!(
            uids.iter()
                .all(|u| (FIRST..=LAST).contains(u) && !named(*u))
        );
        assert_eq!(dynamic(3), dynamic(3));
    }
}
