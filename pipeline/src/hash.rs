//! Content hashes and deterministic point ids shared by the clean, chunk and store stages.

use uuid::Uuid;
use xxhash_rust::xxh3::xxh3_128;

/// Namespace for point ids, fixed forever: changing it would orphan every stored point.
const POINT_NAMESPACE: Uuid = Uuid::from_u128(0x6f72_6269_742d_6d65_6d6f_7279_2d76_3100);

pub fn content_hash(text: &str) -> u128 {
    xxh3_128(text.as_bytes())
}

/// Lowercase hex of a 128-bit hash; runs once per chunk, so no formatting machinery.
pub fn hex128(h: u128) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    (0..32)
        .rev()
        .map(|i| HEX[((h >> (i * 4)) & 0xf) as usize] as char)
        .collect()
}

/// UUIDv5 of (user_id, source ids, chunk index): a rebuild or a redelivered task
/// produces the same ids, so upserts replace instead of duplicating.
pub fn point_id(user_id: i64, source_ids: &[String], chunk_index: u32) -> Uuid {
    let mut name = Vec::with_capacity(32 + source_ids.iter().map(|s| s.len() + 1).sum::<usize>());
    name.extend_from_slice(user_id.to_string().as_bytes());
    for s in source_ids {
        // \x1f cannot appear in a cleaned id, so ("a","bc") and ("ab","c") stay distinct.
        name.push(0x1f);
        name.extend_from_slice(s.as_bytes());
    }
    name.push(0x1e);
    name.extend_from_slice(chunk_index.to_string().as_bytes());
    Uuid::new_v5(&POINT_NAMESPACE, &name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_matches_format() {
        for h in [
            0u128,
            1,
            u128::MAX,
            0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
        ] {
            assert_eq!(hex128(h), format!("{h:032x}"));
        }
    }

    #[test]
    fn point_ids_are_stable_and_distinct() {
        let a = point_id(1, &["m1".into()], 0);
        assert_eq!(a, point_id(1, &["m1".into()], 0));
        assert_ne!(a, point_id(2, &["m1".into()], 0));
        assert_ne!(a, point_id(1, &["m1".into()], 1));
        assert_ne!(
            point_id(1, &["a".into(), "bc".into()], 0),
            point_id(1, &["ab".into(), "c".into()], 0)
        );
    }
}
