//! The DATA decoder's fast path: find how far a body runs as ordinary text, 64 bytes at a time.
//!
//! A block is ordinary when every CR in it is followed by LF, every LF follows a CR, and no line
//! starts with a dot: such a block passes through the decoder unchanged and need not be looked
//! at line by line. Blocks are classified with vector compares: AVX2 when the processor has it
//! (checked at run time), otherwise 16-byte compares through the safe `wide` types. This is the
//! one module of the crate with `unsafe`: the AVX2 intrinsics and the call into them.
#![allow(unsafe_code)]

use wide::u8x16;

/// Width of the blocks classified at once.
const BLOCK: usize = 64;

#[cfg(test)]
thread_local! {
    /// Blocks the walks of this thread have looked at, for the tests that bound them.
    pub(crate) static BLOCKS_WALKED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Returns a position from which the line-by-line scan can go on: inside a line, with no CR or
/// LF just behind it, at or after `pos`. `pos` must be such a position too.
pub(crate) fn clean_blocks(input: &[u8], pos: usize) -> usize {
    if input.len() - pos < BLOCK {
        return pos;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the processor supports AVX2, checked just above.
            return unsafe { avx2::clean_blocks(input, pos) };
        }
    }
    walk(input, pos, masks_portable)
}

/// The block walk, shared by every way of computing the masks.
#[inline(always)]
fn walk(input: &[u8], mut pos: usize, masks: impl Fn(&[u8; BLOCK]) -> (u64, u64)) -> usize {
    let mut safe = pos;
    let (mut carry_cr, mut carry_lf) = (0u64, 0u64);
    while let Some(block) = input.get(pos..pos + BLOCK) {
        let Ok(block) = <&[u8; BLOCK]>::try_from(block) else {
            break;
        };
        #[cfg(test)]
        BLOCKS_WALKED.with(|n| n.set(n.get() + 1));
        let (cr, lf) = masks(block);
        if lf != (cr << 1) | carry_cr {
            break;
        }
        // Line starts are sparse (one per line): look at each for a dot.
        let mut starts = (lf << 1) | carry_lf;
        while starts != 0 {
            if block[starts.trailing_zeros() as usize] == b'.' {
                return safe;
            }
            starts &= starts - 1;
        }
        carry_cr = cr >> 63;
        carry_lf = lf >> 63;
        pos += BLOCK;
        if carry_cr == 0 && carry_lf == 0 {
            safe = pos;
        }
    }
    safe
}

/// CR and LF masks with 16-byte compares.
#[inline(always)]
fn masks_portable(block: &[u8; BLOCK]) -> (u64, u64) {
    let (cr_v, lf_v) = (u8x16::splat(b'\r'), u8x16::splat(b'\n'));
    let (mut cr, mut lf) = (0u64, 0u64);
    for (i, lane) in block.chunks_exact(16).enumerate() {
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(lane);
        let v = u8x16::new(bytes);
        cr |= u64::from(v.simd_eq(cr_v).to_bitmask()) << (16 * i);
        lf |= u64::from(v.simd_eq(lf_v).to_bitmask()) << (16 * i);
    }
    (cr, lf)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::{
        __m256i, _mm256_cmpeq_epi8, _mm256_loadu_si256, _mm256_movemask_epi8, _mm256_set1_epi8,
    };

    use super::{walk, BLOCK};

    /// [`super::clean_blocks`] with 32-byte compares.
    ///
    /// # Safety
    /// The processor must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn clean_blocks(input: &[u8], pos: usize) -> usize {
        walk(input, pos, masks)
    }

    #[inline(always)]
    fn masks(block: &[u8; BLOCK]) -> (u64, u64) {
        let p = block.as_ptr().cast::<__m256i>();
        // SAFETY: `block` is 64 readable bytes, so both unaligned 32-byte loads are in bounds;
        // this only runs inside `clean_blocks`, which requires AVX2.
        unsafe {
            let (a, b) = (_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1)));
            let (cr, lf) = (_mm256_set1_epi8(b'\r' as i8), _mm256_set1_epi8(b'\n' as i8));
            let mask = |v, c| u64::from(_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, c)) as u32);
            (
                mask(a, cr) | mask(b, cr) << 32,
                mask(a, lf) | mask(b, lf) << 32,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(lines: usize) -> Vec<u8> {
        let mut v = Vec::new();
        for i in 0..lines {
            v.extend(std::iter::repeat_n(b'a' + (i % 26) as u8, 70));
            v.extend_from_slice(b"\r\n");
        }
        v
    }

    #[test]
    fn plain_text_is_skipped_and_defects_stop_the_walk() {
        let body = text(100);
        for (name, defect) in [
            ("bare LF", &b"x\ny"[..]),
            ("bare CR", b"x\ry"),
            ("dot line", b"\r\n.x"),
        ] {
            let mut input = body.clone();
            let at = 3000;
            input.splice(at..at + defect.len(), defect.iter().copied());
            for f in [clean_blocks, |i: &[u8], p| walk(i, p, masks_portable)] {
                let safe = f(&input, 1);
                assert!(safe <= at, "{name}: walked past the defect to {safe}");
                assert!(safe + 2 * BLOCK > at, "{name}: stopped early at {safe}");
                assert!(input[safe - 1] != b'\r' && input[safe - 1] != b'\n');
            }
        }
        let safe = clean_blocks(&body, 1);
        assert!(safe + 2 * BLOCK >= body.len());
    }
}
