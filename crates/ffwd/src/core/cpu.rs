//! Which SIMD code paths run: the widest the CPU has (AVX-512F, then AVX2 + FMA, then portable
//! code), or a narrower one forced with the environment variable `FFWD_SIMD` (`avx512`, `avx2`
//! or `scalar`), read once per process. Forcing lets tests run every path on one machine;
//! forcing a level the CPU lacks falls back to what it has (never an illegal instruction).
//! The `gemm` crate behind large matrix products dispatches on its own and is not affected.

use std::sync::OnceLock;

use crate::error::{Error, Result};

/// A family of SIMD kernels, narrowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    /// Portable Rust (auto-vectorised for the baseline target at most).
    Scalar,
    /// AVX2 with FMA.
    Avx2,
    /// AVX-512F.
    Avx512,
}

impl SimdLevel {
    /// The name used by `FFWD_SIMD`.
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Scalar => "scalar",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" | "portable" => Some(SimdLevel::Scalar),
            "avx2" => Some(SimdLevel::Avx2),
            "avx512" | "avx512f" => Some(SimdLevel::Avx512),
            _ => None,
        }
    }
}

/// The widest level this CPU supports.
pub fn detected() -> SimdLevel {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return SimdLevel::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return SimdLevel::Avx2;
        }
    }
    SimdLevel::Scalar
}

static LEVEL: OnceLock<SimdLevel> = OnceLock::new();

/// The level in use: `FFWD_SIMD` (capped at what the CPU has) or the detected one. An unknown
/// `FFWD_SIMD` value is ignored here; [`check_env`] reports it.
#[inline]
pub fn level() -> SimdLevel {
    *LEVEL.get_or_init(|| {
        let cpu = detected();
        std::env::var("FFWD_SIMD").ok().and_then(|v| SimdLevel::parse(&v)).map_or(cpu, |forced| forced.min(cpu))
    })
}

/// True when the AVX-512F kernels may run.
#[inline]
pub fn avx512() -> bool {
    level() >= SimdLevel::Avx512
}

/// True when the AVX2 + FMA kernels may run.
#[inline]
pub fn avx2() -> bool {
    level() >= SimdLevel::Avx2
}

/// Checks `FFWD_SIMD`: an error naming the value when it is set to something unknown, or to
/// a level this CPU does not have.
pub fn check_env() -> Result<()> {
    let Ok(v) = std::env::var("FFWD_SIMD") else { return Ok(()) };
    match SimdLevel::parse(&v) {
        None => Err(Error::Config(format!("FFWD_SIMD=`{v}` is not one of avx512, avx2, scalar"))),
        Some(l) if l > detected() => Err(Error::Config(format!("FFWD_SIMD={}: this CPU supports at most {}", l.name(), detected().name()))),
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_levels_are_ordered() {
        for l in [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512] {
            assert_eq!(SimdLevel::parse(l.name()), Some(l));
        }
        assert_eq!(SimdLevel::parse("AVX512F"), Some(SimdLevel::Avx512));
        assert_eq!(SimdLevel::parse("sse"), None);
        assert!(SimdLevel::Scalar < SimdLevel::Avx2 && SimdLevel::Avx2 < SimdLevel::Avx512);
        assert!(level() <= detected());
    }
}
