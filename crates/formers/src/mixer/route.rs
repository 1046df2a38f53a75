//! The one choice of how softmax attention runs: the fused op straight from the
//! projections, the fused op on heads, candle's single tile (inference only) or candle's
//! tiled online softmax. [`heads`](super::heads), [`softmax`](super::softmax) and
//! [`local`](super::local) ask [`route`]; none decides on its own.

use candle_core::{DType, Tensor};

/// The facts the choice depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Case {
    /// The inputs are f32 on the CPU.
    pub f32_cpu: bool,
    /// Built for inference: no gradient will be taken (forward-only kernels allowed).
    pub inference: bool,
    /// The mask has a fused form (the clipped softmax, say, has none).
    pub fusable: bool,
    /// Queries, keys and values are still merged as projected, `[b, n, h·dh]`: nothing
    /// (RoPE, a value residual, an output gate, packed sequences, a decoding cache) needs
    /// the heads split first.
    pub merged: bool,
    /// Every query and key fits one tile of a kernel with a single-tile path.
    pub one_tile: bool,
}

impl Case {
    /// The case of inputs like `t`, split into heads, not fusable, not one tile, training.
    pub fn of(t: &Tensor) -> Self {
        Case {
            f32_cpu: t.dtype() == DType::F32 && t.device().is_cpu(),
            inference: false,
            fusable: false,
            merged: false,
            one_tile: false,
        }
    }
}

/// How attention runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The fused FlashAttention op on the merged projections (it splits the heads inside).
    FusedMerged,
    /// The fused FlashAttention op on heads `[b, h, n, dh]` (differentiable, O(n·d) memory).
    Fused,
    /// One tile through candle's fused, forward-only softmax (inference only).
    SingleTile,
    /// Candle's composed ops in tiles (other types and devices, the clipped softmax, the
    /// reference with the fused kernels off).
    Tiled,
}

/// Chooses the route of `case`: a fused op when the mask has one and the fused kernels
/// take the inputs ([`crate::kernels::fused_enabled`]), straight from the projections when
/// nothing splits the heads; the single tile in inference before the fused op on heads.
pub fn route(case: Case) -> Route {
    let fused = case.fusable && case.f32_cpu && crate::kernels::fused_enabled();
    if case.merged && fused {
        Route::FusedMerged
    } else if case.inference && case.one_tile && case.fusable && case.f32_cpu {
        Route::SingleTile
    } else if fused {
        Route::Fused
    } else {
        Route::Tiled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_fused_op_only_with_the_fused_kernels_on_and_the_single_tile_only_in_inference() {
        let x = Tensor::zeros((1, 2, 4), DType::F32, &Device::Cpu).unwrap();
        let case = Case {
            fusable: true,
            merged: true,
            ..Case::of(&x)
        };
        assert_eq!(route(case), Route::FusedMerged);
        let heads = Case {
            merged: false,
            one_tile: true,
            ..case
        };
        assert_eq!(route(heads), Route::Fused);
        let infer = Case {
            inference: true,
            ..heads
        };
        assert_eq!(route(infer), Route::SingleTile);
        crate::kernels::with_reference(|| {
            assert_eq!(route(case), Route::Tiled);
            assert_eq!(route(infer), Route::SingleTile);
        });
        let clipped = Case {
            fusable: false,
            ..infer
        };
        assert_eq!(route(clipped), Route::Tiled);
        let f64_case = Case {
            f32_cpu: false,
            ..infer
        };
        assert_eq!(route(f64_case), Route::Tiled);
    }
}
