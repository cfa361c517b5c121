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
