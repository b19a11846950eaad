//! Activation statistics the models record as probes on the steps that log them: massive
//! activations (Sun et al. 2024: a few entries of a block's output ~1000× the median), MLP
//! activation sparsity, and each head's largest query and key norm (what drives attention-logit
//! growth; Wortsman et al. 2023). On a GPU they are reductions on the device (`core::ops::stats`:
//! a few numbers come down, not the activation), and only run when the sink asks for their
//! family (`ProbeSink::set`).

use dptrain_core::ops::stats;
use dptrain_core::probe::{ProbeSink, Reduce};
use dptrain_core::{Result, Tensor, Var};

/// Massive activations of a block output `x [B, T, C]`: `massive_top1/<i>` (largest |h|, Max),
/// `massive_median/<i>` (median |h|, Mean), `massive_ratio/<i>` (their ratio, Max), and where the
/// top-1 is: `massive_top1/<i>@token` (position in the sequence) and `@channel`.
pub fn record_massive(sink: &mut dyn ProbeSink, layer: usize, x: &Var<'_>) -> Result<()> {
    let shape = x.shape();
    let (t, c) = (shape[shape.len() - 2], shape[shape.len() - 1]);
    let v = x.value();
    let (top1, at) = stats::abs_top1(&v)?;
    let median = stats::abs_kth_smallest(&v, v.numel() / 2)? as f64;
    let top1 = top1 as f64;
    sink.record(&format!("massive_top1/{layer}"), Reduce::Max, top1);
    sink.record(&format!("massive_median/{layer}"), Reduce::Mean, median);
    sink.record(&format!("massive_ratio/{layer}"), Reduce::Max, top1 / median.max(f64::MIN_POSITIVE));
    sink.record(&format!("massive_top1/{layer}@token"), Reduce::At, ((at / c) % t) as f64);
    sink.record(&format!("massive_top1/{layer}@channel"), Reduce::At, (at % c) as f64);
    Ok(())
}

/// `mlp_sparsity/<i>`: the fraction of an MLP's post-activation entries ≤ `threshold`.
pub fn record_sparsity(sink: &mut dyn ProbeSink, layer: usize, v: &Tensor, threshold: f64) -> Result<()> {
    let below = stats::count_at_most(v, threshold)?;
    sink.record(&format!("mlp_sparsity/{layer}"), Reduce::Mean, below as f64 / v.numel().max(1) as f64);
    Ok(())
}

/// `q_norm_max/<i>/<head>` and `k_norm_max/<i>/<head>`: each head's largest query / key norm over
/// the batch's tokens, from the packed projection `qkv [B, T, 3C]` (before any qk-layernorm:
/// the growth the norm would hide).
pub fn record_qk_norms(sink: &mut dyn ProbeSink, layer: usize, qkv: &Var<'_>, n_heads: usize) -> Result<()> {
    let c3 = *qkv.shape().last().unwrap_or(&3);
    // The q and k heads lead each row (v's follow and are not looked at).
    let max = stats::segment_norm_max(&qkv.value(), c3, c3 / 3 / n_heads, 2 * n_heads)?;
    for h in 0..n_heads {
        sink.record(&format!("q_norm_max/{layer}/{h}"), Reduce::Max, max[h]);
        sink.record(&format!("k_norm_max/{layer}/{h}"), Reduce::Max, max[n_heads + h]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dptrain_core::probe::Probes;
    use dptrain_core::{Tape, Tensor};

    #[test]
    fn massive_activation_top1_median_and_where() {
        // [B 2, T 3, C 4]: |h| values 1..24 except one planted 5000 at (b 1, t 2, c 1).
        let mut v: Vec<f32> = (1..=24).map(|x| if x % 2 == 0 { -(x as f32) } else { x as f32 }).collect();
        v[12 + 2 * 4 + 1] = -5000.0;
        let tape = Tape::new();
        let x = tape.constant(Tensor::from_vec(v, &[2, 3, 4]).unwrap());
        let mut p = Probes::default();
        record_massive(&mut p, 3, &x).unwrap();
        assert_eq!(p.get("massive_top1/3"), Some(5000.0));
        // The 24 magnitudes are 1..=24 with 22 replaced: the upper median (index 12) is 13.
        assert_eq!(p.get("massive_median/3"), Some(13.0));
        assert_eq!(p.get("massive_ratio/3"), Some(5000.0 / 13.0));
        assert_eq!(p.get("massive_top1/3@token"), Some(2.0));
        assert_eq!(p.get("massive_top1/3@channel"), Some(1.0));
    }

    #[test]
    fn sparsity_counts_entries_at_or_below_the_threshold() {
        let tape = Tape::new();
        let a = tape.constant(Tensor::from_vec(vec![0.0f32, -0.1, 0.2, 0.5, 0.05, 1.0, -2.0, 0.0], &[2, 4]).unwrap());
        let mut p = Probes::default();
        record_sparsity(&mut p, 0, &a.value(), 0.0).unwrap();
        record_sparsity(&mut p, 1, &a.value(), 0.1).unwrap();
        assert_eq!(p.get("mlp_sparsity/0"), Some(4.0 / 8.0));
        assert_eq!(p.get("mlp_sparsity/1"), Some(5.0 / 8.0));
    }

    #[test]
    fn qk_norms_per_head_are_the_largest_over_tokens() {
        // 2 tokens, 2 heads of d 2: q = [h0 | h1], k = [h0 | h1], v ignored.
        let row = |q: [f32; 4], k: [f32; 4]| -> Vec<f32> { q.into_iter().chain(k).chain([9.0; 4]).collect() };
        let mut v = row([3.0, 4.0, 0.0, 1.0], [1.0, 0.0, 6.0, 8.0]);
        v.extend(row([0.0, 1.0, 5.0, 12.0], [0.0, 2.0, 0.0, 0.0]));
        let tape = Tape::new();
        let qkv = tape.constant(Tensor::from_vec(v, &[1, 2, 12]).unwrap());
        let mut p = Probes::default();
        record_qk_norms(&mut p, 0, &qkv, 2).unwrap();
        assert_eq!(p.get("q_norm_max/0/0"), Some(5.0));
        assert_eq!(p.get("q_norm_max/0/1"), Some(13.0));
        assert_eq!(p.get("k_norm_max/0/0"), Some(2.0));
        assert_eq!(p.get("k_norm_max/0/1"), Some(10.0));
    }
}
