//! CSI volume ids. Later calls carry only the id (and secrets), so it names the pool as well
//! as the volume: `<volume>@<pool URL>`, e.g. `pvc-1f2e@swift://pool` or
//! `data@file:///srv/pool`.

use std::fmt;

/// A parsed volume id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VolumeId {
    /// The volume's name in its pool.
    pub volume: String,
    /// The pool's store URL (`swift://<container>` or `file:///path`).
    pub pool: String,
}

impl VolumeId {
    /// `None` when `id` is not one cloudfs hands out (the volume cannot exist).
    pub fn parse(id: &str) -> Option<VolumeId> {
        let (volume, pool) = id.split_once('@')?;
        let name_ok = !volume.is_empty()
            && volume.len() <= 128
            && !volume.starts_with('.')
            && volume
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        let pool_ok = pool
            .strip_prefix("swift://")
            .is_some_and(|container| !container.is_empty() && !container.contains('/'))
            || pool.starts_with("file:///");
        (name_ok && pool_ok).then(|| VolumeId {
            volume: volume.to_owned(),
            pool: pool.to_owned(),
        })
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.volume, self.pool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_foreign_ones_are_refused() {
        for id in ["pvc-1@swift://pool", "v.1_x@file:///srv/pool"] {
            let parsed = VolumeId::parse(id).expect(id);
            assert_eq!(parsed.to_string(), id);
        }
        for bad in [
            "",
            "vol",
            "@swift://pool",
            "v@",
            "v@swift://",
            "v@swift://a/b",
            "v@http://x",
            "v@file://relative",
            ".v@swift://p",
            "a b@swift://p",
        ] {
            assert_eq!(VolumeId::parse(bad), None, "{bad}");
        }
    }
}
