//! Differentiable ops, one file per family. Each op computes its forward with the kernel for the
//! tensor's device and dtype and records a backward closure on the tape. Ops are methods on
//! [`Var`](crate::autograd::Var) (`x.matmul(w)`, `x.gelu(..)`), so model code reads like math.

pub mod conv;
pub mod dropout;
pub mod elementwise;
pub mod embedding;
pub mod flat;
pub mod fused;
pub mod linalg;
pub mod matmul;
pub mod reduce;
pub mod shape;
pub mod stats;

/// Returns `$gpu` from the enclosing function (or closure) when `$t` lives on a CUDA device,
/// with `gpu` naming the CUDA tensor-level ops; compiled out without the `cuda` feature.
#[macro_export]
#[doc(hidden)]
macro_rules! on_cuda {
    ($t:expr => $gpu:expr) => {
        #[cfg(feature = "cuda")]
        if $t.is_cuda() {
            #[allow(unused_imports)]
            use $crate::kernels::cuda::ops as gpu;
            return $gpu;
        }
    };
}

/// Runs `$body` with `$T` bound to the Rust element type of `$dtype` (f32 or f64); bf16 is a
/// storage format on CPU and is rejected with a dtype error.
#[macro_export]
#[doc(hidden)]
macro_rules! with_float {
    ($dtype:expr, $op:expr, $T:ident => $body:expr) => {
        match $dtype {
            $crate::tensor::DType::F32 => {
                #[allow(unused_imports)]
                use $crate::{
                    num_traits::{Float as _, One as _, Zero as _},
                    tensor::Elem as _,
                };
                type $T = f32;
                $body
            }
            $crate::tensor::DType::F64 => {
                #[allow(unused_imports)]
                use $crate::{
                    num_traits::{Float as _, One as _, Zero as _},
                    tensor::Elem as _,
                };
                type $T = f64;
                $body
            }
            other => Err($crate::error::Error::DType { op: $op, expected: "f32 or f64".into(), got: other.to_string() }),
        }
    };
}
