//! Functions compiled for the CPU's widest vectors, chosen at run time.
//!
//! The hot loops (Winograd transforms, the turned-around convolution's additions) are written
//! over fixed-size lane arrays that the compiler vectorises; built for baseline x86-64 that
//! means 4-wide SSE2. `multiversion!` compiles a function's body three times, for AVX-512
//! (16 lanes, one register a lane array), AVX2 + FMA and the baseline, and calls the one the
//! CPU supports. The body and everything it calls must be `#[inline(always)]` so it is
//! compiled inside the feature-enabled copy: called through a closure (pulp's `dispatch`, as
//! before), the body stayed a separate function built for SSE2.

use std::sync::atomic::AtomicU8;

/// The widest copy the multiversioned functions may pick: 2 AVX-512, 1 AVX2 + FMA, 0 the
/// baseline. Tests lower it to run every copy on a machine that has them all.
pub static MAX_LEVEL: AtomicU8 = AtomicU8::new(2);

/// `multiversion! { fn name(arg: Type, …) { body } }`: see the module documentation.
#[macro_export]
macro_rules! multiversion {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$attr])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn generic($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v4($($arg: $ty),*) {
                    generic($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v3($($arg: $ty),*) {
                    generic($($arg),*)
                }
                let max = $crate::simd::MAX_LEVEL.load(std::sync::atomic::Ordering::Relaxed);
                if max >= 2 && std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: this CPU has every feature v4 is compiled for (checked above).
                    return unsafe { v4($($arg),*) };
                }
                if max >= 1 && std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: this CPU has every feature v3 is compiled for (checked above).
                    return unsafe { v3($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}

/// The lane arrays the multiversioned bodies work on: one AVX-512 register of f32.
pub const LANES: usize = 16;

/// `exp` of every lane (Cephes' `expf`: `x = n·ln 2 + r`, a degree-6 polynomial in `r`, `2ⁿ`
/// put into the exponent bits; within 2 ulp of `f32::exp` over the arguments kept). Arguments
/// are clamped to [−87.3, 88.3], where `exp` stays a normal float; below that it returns about
/// 1e-38 where 0 would be exact, which no sum of softmax or sigmoid can tell.
#[inline(always)]
pub fn exp_lanes(x: [f32; LANES]) -> [f32; LANES] {
    std::array::from_fn(|i| {
        let x = x[i].clamp(-87.3, 88.3);
        // Round to nearest by the 1.5·2²³ trick: vectorises where `round` may not.
        let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
        let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
        let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 0.166_666_65) * r + 0.5;
        let e = p * r * r + r + 1.0;
        e * f32::from_bits(((n as i32 + 127) as u32) << 23)
    })
}

/// Deterministic test values spread over `[lo, lo + width)`, from a seeded LCG.
#[cfg(test)]
pub(crate) fn noise(n: usize, seed: u64, lo: f32, width: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * width + lo
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_lanes_is_within_two_ulp_of_exp() {
        let mut worst = 0f32;
        for i in 0..=1_000_000 {
            let x = -87.0 + 175.0 * i as f32 / 1e6;
            let got = exp_lanes([x; LANES])[0];
            let want = (x as f64).exp();
            worst = worst.max(((got as f64 - want) / want).abs() as f32);
        }
        assert!(worst < 2.5 * f32::EPSILON, "relative error {worst}");
        assert!(exp_lanes([-1000.0; LANES])[0] < 1e-37);
    }
}
