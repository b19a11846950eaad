//! Every differentiable op against central finite differences in f64 on small random inputs.
//! The op's output is contracted with fixed random weights (loss = Σ out ⊙ R) so every output
//! element's gradient path is exercised. Pass: ‖analytic − numeric‖ ≤ 1e-6 · max(‖numeric‖, 1e-3)
//! and every element within 1e-6 · max(1, |numeric|).

use dptrain_core::ops::fused::batch_norm::RunningStats;
use dptrain_core::ops::shape::cat;
use dptrain_core::rng::Rng;
use dptrain_core::{DType, Result, Tape, Tensor, Var};
use std::sync::Mutex;

fn rand(shape: &[usize], rng: &mut Rng, lo: f64, hi: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| lo + (hi - lo) * rng.uniform()).collect();
    Tensor::from_vec(v, shape).unwrap()
}

/// Checks gradients of `f(inputs)` w.r.t. each input.
fn check(name: &str, inputs: Vec<Tensor>, f: impl for<'t> Fn(&'t Tape, &[Var<'t>]) -> Result<Var<'t>>) {
    let loss_of = |vals: &[Tensor], want_grads: bool| -> (f64, Vec<Tensor>) {
        let tape = Tape::new();
        let vars: Vec<Var> = vals.iter().map(|v| tape.leaf(v.clone())).collect();
        let out = f(&tape, &vars).unwrap();
        let mut rng = Rng::new(99);
        let r = rand(&out.shape(), &mut rng, -1.0, 1.0);
        let loss = out.mul(tape.constant(r)).unwrap().sum_all().unwrap();
        let l = loss.item().unwrap();
        if !want_grads {
            return (l, vec![]);
        }
        let store = dptrain_core::ParamBuilder::new().build(0, DType::F64).unwrap();
        let mut grads = dptrain_core::GradStore::new(&store);
        let lg = tape.backward(loss, &mut grads, |_, _| {}).unwrap();
        let gs = vars.iter().map(|v| lg.get(*v).map(|g| g.contiguous()).unwrap_or_else(|| Tensor::zeros(&v.shape(), DType::F64))).collect();
        (l, gs)
    };
    let (_, analytic) = loss_of(&inputs, true);
    let h = 1e-6;
    for (k, inp) in inputs.iter().enumerate() {
        let base = inp.to_vec::<f64>().unwrap();
        let a = analytic[k].to_vec::<f64>().unwrap();
        assert_eq!(a.len(), base.len(), "{name}: grad size for input {k}");
        let mut num = vec![0.0; base.len()];
        for i in 0..base.len() {
            let eval = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                let mut vals = inputs.clone();
                vals[k] = Tensor::from_vec(v, inp.shape()).unwrap();
                loss_of(&vals, false).0
            };
            num[i] = (eval(h) - eval(-h)) / (2.0 * h);
        }
        let diff: f64 = a.iter().zip(&num).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
        let nn: f64 = num.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!(nn > 0.0 || name.contains("zero"), "{name}: input {k}: numeric gradient is identically zero");
        assert!(diff <= 1e-6 * nn.max(1e-3), "{name}: input {k}: ‖a−n‖ = {diff:e}, ‖n‖ = {nn:e}\n a = {a:?}\n n = {num:?}");
        for (x, y) in a.iter().zip(&num) {
            assert!((x - y).abs() <= 1e-6 * y.abs().max(1.0), "{name}: input {k}: element {x} vs {y}");
        }
    }
}

fn r(shape: &[usize], seed: u64) -> Tensor {
    rand(shape, &mut Rng::new(seed), -1.0, 1.0)
}

#[test]
fn elementwise_broadcasting() {
    check("add same", vec![r(&[3, 4], 1), r(&[3, 4], 2)], |_, v| v[0].add(v[1]));
    check("add bias", vec![r(&[2, 3, 4], 1), r(&[4], 2)], |_, v| v[0].add(v[1]));
    check("add general", vec![r(&[2, 1, 4], 1), r(&[3, 1], 2)], |_, v| v[0].add(v[1]));
    check("sub bias-left", vec![r(&[4], 1), r(&[3, 4], 2)], |_, v| v[0].sub(v[1]));
    check("mul general", vec![r(&[2, 3, 1], 3), r(&[1, 3, 4], 4)], |_, v| v[0].mul(v[1]));
    let pos = rand(&[3, 4], &mut Rng::new(5), 0.5, 2.0);
    check("div", vec![r(&[3, 4], 6), pos.clone()], |_, v| v[0].div(v[1]));
    check("div broadcast", vec![r(&[3, 4], 6), rand(&[4], &mut Rng::new(7), 0.5, 2.0)], |_, v| v[0].div(v[1]));
    check("affine", vec![r(&[5], 8)], |_, v| v[0].affine(-2.5, 0.3));
    check("exp", vec![r(&[5], 9)], |_, v| v[0].exp());
    check("log", vec![pos], |_, v| v[0].log());
    check("tanh", vec![r(&[6], 10)], |_, v| v[0].tanh());
    check("relu", vec![r(&[7], 11)], |_, v| v[0].relu());
    check("square", vec![r(&[7], 12)], |_, v| v[0].square());
}

#[test]
fn reductions_and_shapes() {
    check("sum dims", vec![r(&[2, 3, 4], 1)], |_, v| v[0].sum_dims(&[0, 2], false));
    check("sum keepdim", vec![r(&[2, 3, 4], 2)], |_, v| v[0].sum_dims(&[1], true));
    check("mean", vec![r(&[2, 3, 4], 3)], |_, v| v[0].mean_dims(&[2], false));
    check("mean all", vec![r(&[2, 3], 3)], |_, v| v[0].mean_all());
    check("reshape", vec![r(&[2, 6], 4)], |_, v| v[0].reshape(&[3, 4]));
    check("transpose", vec![r(&[2, 3, 4], 5)], |_, v| v[0].transpose(0, 2)?.exp());
    check("permute", vec![r(&[2, 3, 4], 6)], |_, v| v[0].permute(&[1, 2, 0])?.tanh());
    check("narrow", vec![r(&[4, 5], 7)], |_, v| v[0].narrow(1, 1, 3));
    check("cat", vec![r(&[2, 3], 8), r(&[2, 2], 9)], |_, v| cat(&[v[0], v[1]], 1));
    check("split", vec![r(&[5, 2], 10)], |_, v| {
        let p = v[0].split(0, &[2, 3])?;
        p[0].sum_all()?.add(p[1].square()?.sum_all()?)
    });
}

#[test]
fn matmul_family() {
    check("matmul 2d", vec![r(&[3, 4], 1), r(&[4, 5], 2)], |_, v| v[0].matmul(v[1]));
    check("matmul 3d x 2d", vec![r(&[2, 3, 4], 3), r(&[4, 2], 4)], |_, v| v[0].matmul(v[1]));
    check("matmul batched", vec![r(&[2, 3, 4], 5), r(&[2, 4, 3], 6)], |_, v| v[0].matmul(v[1]));
    check("matmul transposed operand", vec![r(&[3, 4], 7), r(&[5, 4], 8)], |_, v| v[0].matmul(v[1].t()?));
    check("linear", vec![r(&[2, 3, 4], 9), r(&[5, 4], 10), r(&[5], 11)], |_, v| v[0].linear(v[1], Some(v[2])));
    check("linear no bias", vec![r(&[3, 4], 12), r(&[2, 4], 13)], |_, v| v[0].linear(v[1], None));
}

#[test]
fn embedding_and_conv() {
    check("embedding", vec![r(&[5, 3], 1)], |_, v| v[0].embedding(&[0, 4, 4, 2, 1, 0], &[2, 3]));
    check("conv2d pad1", vec![r(&[2, 2, 4, 4], 2), r(&[3, 2, 3, 3], 3), r(&[3], 4)], |_, v| v[0].conv2d(v[1], Some(v[2]), 1, 1));
    check("conv2d stride2", vec![r(&[1, 2, 5, 5], 5), r(&[2, 2, 3, 3], 6)], |_, v| v[0].conv2d(v[1], None, 2, 0));
    check("conv2d 1x1 stride2", vec![r(&[2, 3, 4, 4], 7), r(&[2, 3, 1, 1], 8)], |_, v| v[0].conv2d(v[1], None, 2, 0));
}

fn stats(c: usize) -> (Mutex<Tensor>, Mutex<Tensor>) {
    (Mutex::new(Tensor::zeros(&[c], DType::F64)), Mutex::new(Tensor::ones(&[c], DType::F64)))
}

#[test]
fn fused_ops() {
    check("layer_norm affine", vec![r(&[3, 8], 1), r(&[8], 2), r(&[8], 3)], |_, v| v[0].layer_norm(Some(v[1]), Some(v[2]), 1e-5));
    check("layer_norm plain", vec![r(&[2, 3, 6], 4)], |_, v| v[0].layer_norm(None, None, 1e-5));
    // 2 heads of d_head 4: the query and key rows normalised with their own affine, values passed.
    check("qk_layer_norm affine", vec![r(&[2, 3, 24], 5), r(&[2, 4], 6), r(&[2, 4], 7)], |_, v| {
        v[0].qk_layer_norm(2, Some(v[1]), Some(v[2]), 1e-5)
    });
    check("qk_layer_norm plain", vec![r(&[1, 5, 12], 8)], |_, v| v[0].qk_layer_norm(1, None, None, 1e-5));
    check("gelu erf", vec![rand(&[9], &mut Rng::new(5), -3.0, 3.0)], |_, v| v[0].gelu(false));
    check("gelu tanh", vec![rand(&[9], &mut Rng::new(6), -3.0, 3.0)], |_, v| v[0].gelu(true));
    check("attention", vec![r(&[2, 5, 12], 7)], |_, v| Ok(v[0].causal_attention(2)?.y));
    check("attention, scale 1/d", vec![r(&[2, 5, 12], 27)], |_, v| Ok(v[0].causal_attention_scaled(2, None, Some(0.5))?.y));
    // Dropout with a fixed mask (fixed key): a linear map, so central differences see it exactly.
    let drop = dptrain_core::ops::dropout::Dropout::new(0.4, 1234).unwrap();
    check("dropout", vec![r(&[6, 7], 21)], |_, v| v[0].dropout(drop));
    check("attention + dropout", vec![r(&[2, 6, 12], 22)], |_, v| Ok(v[0].causal_attention_dropout(2, drop)?.y));
    check("cross_entropy", vec![r(&[4, 6], 8)], |_, v| Ok(v[0].cross_entropy(&[0, 5, 3, 3], 0.0)?.loss));
    check("cross_entropy z-loss", vec![r(&[4, 6], 9)], |_, v| Ok(v[0].cross_entropy(&[1, 2, 3, 4], 0.1)?.loss));
    let (m, var) = stats(3);
    check("batch_norm train 4d", vec![r(&[2, 3, 2, 2], 10), r(&[3], 11), r(&[3], 12)], |_, v| {
        v[0].batch_norm(v[1], v[2], RunningStats { mean: &m, var: &var, momentum: 0.1 }, true, 1e-5)
    });
    let (m, var) = stats(4);
    check("batch_norm train 2d", vec![r(&[5, 4], 13), r(&[4], 14), r(&[4], 15)], |_, v| {
        v[0].batch_norm(v[1], v[2], RunningStats { mean: &m, var: &var, momentum: 0.1 }, true, 1e-5)
    });
    let (m, var) = stats(3);
    check("ghost batch_norm train 4d", vec![r(&[6, 3, 2, 2], 21), r(&[3], 22), r(&[3], 23)], |_, v| {
        v[0].ghost_batch_norm(v[1], v[2], RunningStats { mean: &m, var: &var, momentum: 0.1 }, true, 1e-5, 2)
    });
    let (m, var) = stats(4);
    check("ghost batch_norm train 2d", vec![r(&[6, 4], 24), r(&[4], 25), r(&[4], 26)], |_, v| {
        v[0].ghost_batch_norm(v[1], v[2], RunningStats { mean: &m, var: &var, momentum: 0.1 }, true, 1e-5, 3)
    });
    let (m, var) = (Mutex::new(r(&[4], 16)), Mutex::new(rand(&[4], &mut Rng::new(17), 0.5, 2.0)));
    check("batch_norm eval", vec![r(&[5, 4], 18), r(&[4], 19), r(&[4], 20)], |_, v| {
        v[0].batch_norm(v[1], v[2], RunningStats { mean: &m, var: &var, momentum: 0.1 }, false, 1e-5)
    });
}

/// The checker itself must catch a wrong backward (here: d(2x)/dx reported as 1).
#[test]
#[should_panic(expected = "wrong-backward")]
fn checker_catches_a_wrong_gradient() {
    check("wrong-backward", vec![r(&[4], 1)], |tape, v| {
        let x = v[0].value();
        let y = dptrain_core::ops::elementwise::t::affine(&x, 2.0, 0.0)?;
        Ok(tape.record("double", y, &[v[0]], |g| Ok(vec![Some(g.clone())])))
    });
}
