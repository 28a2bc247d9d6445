//! The unique key of a line, as `store.line_key(line)` indexes it: the line's own
//! bytes up to [`KEY_INLINE_MAX`] bytes (bytewise order, so sorted input appends at the
//! right edge of the index), else `0xFF` followed by its SHA-256. A btree entry cannot
//! exceed about 2.7 KB, so longer lines need the hash; `0xFF` never occurs in UTF-8, so
//! the two kinds of key cannot collide.

use sha2::{Digest, Sha256};

/// Lines up to this many bytes are their own key (2,000: well below the btree limit).
pub(crate) const KEY_INLINE_MAX: usize = 2000;

/// The key of `line`.
pub fn line_key(line: &[u8]) -> Vec<u8> {
    if line.len() <= KEY_INLINE_MAX {
        return line.to_vec();
    }
    let mut k = Vec::with_capacity(33);
    k.push(0xFF);
    k.extend_from_slice(&Sha256::digest(line));
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lines_get_a_hash_key_that_cannot_meet_a_short_one() {
        assert_eq!(line_key(b"abc"), b"abc");
        let long = vec![b'y'; 60 * 1024];
        let k = line_key(&long);
        assert_eq!((k.len(), k[0]), (33, 0xFF));
        assert_ne!(k, line_key(&long[1..]));
        assert_eq!(line_key(&[b'x'; KEY_INLINE_MAX]).len(), KEY_INLINE_MAX);
        assert_eq!(line_key(&[b'x'; KEY_INLINE_MAX + 1]).len(), 33);
    }
}
