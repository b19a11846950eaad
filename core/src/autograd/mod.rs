//! The autograd tape.
//!
//! Ops append nodes (value, input ids, a backward closure holding what it saved); `backward`
//! walks them in reverse. Design points, each from a measured cost or a past bug:
//! - Gradients of intermediates are **moved in** on first contribution and added in place after
//!   (never `zeros + add`) — on a GPU by the contributing op itself where it can ([`GradSink`]);
//!   parameter gradients go straight into the flat [`GradStore`].
//! - A "parameter gradient final" callback fires the moment a parameter's last use has been
//!   processed, in backward order, exactly once per parameter per pass — the data-parallel
//!   reducer starts a bucket's all-reduce on it while backward continues.
//! - A node recorded without a backward that a gradient reaches is an error, never a silent stop.
//! - In eval mode (`Tape::inference`) nothing is saved for backward.

use crate::error::{Error, Result};
use crate::params::{GradStore, ParamId, ParamStore};
use crate::tensor::{DType, Precision, Tensor};
use std::cell::RefCell;
use std::collections::HashMap;

pub type BackwardFn = Box<dyn FnOnce(&Tensor) -> Result<Vec<Option<Tensor>>>>;

/// An input's gradient slot on a GPU, offered to the backward of an op: a parameter's slot in
/// the flat gradient buffer, or the gradient an intermediate has already received from a later
/// use (the residual stream's). The op may write its gradient there itself (a weight-gradient
/// GEMM with beta = 0, or 1 to add; a layer norm's backward adding its dx — no temporary, no
/// accumulation pass) and then returns `None` for that input. Offered through
/// [`take_grad_sink`] while the op's backward runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GradSink {
    /// Device address of the parameter's f32 gradient.
    pub ptr: u64,
    /// Its element count.
    pub len: usize,
    /// Add to what is there (something contributed since `zero_grad`), else overwrite.
    pub accumulate: bool,
}

thread_local! {
    /// The sinks of the op whose backward is running, by input position; taken ones are `None`.
    static SINKS: RefCell<Vec<Option<GradSink>>> = const { RefCell::new(Vec::new()) };
    static TAKEN: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

/// Inside an op's backward: the gradient slot of its input at `position` when the tape offers
/// one (see [`GradSink`]). Taking it is a promise to
/// write the whole gradient there, and to return `None` for that input.
pub fn take_grad_sink(position: usize) -> Option<GradSink> {
    let s = SINKS.with(|s| s.borrow_mut().get_mut(position).and_then(Option::take));
    if s.is_some() {
        TAKEN.with(|t| t.borrow_mut().push(position));
    }
    s
}

struct Node {
    name: &'static str,
    value: Tensor,
    inputs: Vec<usize>,
    requires_grad: bool,
    /// `None` with `requires_grad` means "no backward": an error if a gradient arrives.
    backward: Option<BackwardFn>,
    param: Option<ParamId>,
    /// A bf16 activation held in f32 (the CPU's model of a GPU's bf16 tensor): its gradient is
    /// rounded to bf16 before its backward runs, as the GPU stores it.
    half: bool,
    /// A parameter's bf16 copy kept by the optimizer (`ParamStore::half`), for bf16 GEMMs.
    twin: Option<Tensor>,
}

pub struct Tape {
    nodes: RefCell<Vec<Node>>,
    params: RefCell<HashMap<ParamId, usize>>,
    grad_enabled: bool,
    used: std::cell::Cell<bool>,
    precision: std::cell::Cell<Precision>,
    rng_key: std::cell::Cell<u64>,
    /// The same key in device memory, for steps a CUDA graph replays (see `ops::dropout`).
    device_rng_key: RefCell<Option<crate::ops::dropout::DeviceKey>>,
}

/// A handle to a value on a tape.
#[derive(Clone, Copy)]
pub struct Var<'t> {
    tape: &'t Tape,
    id: usize,
}

impl std::fmt::Debug for Var<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Var#{}({:?})", self.id, self.value().shape())
    }
}

/// Gradients of non-parameter leaves (created with [`Tape::leaf`]), by leaf.
pub struct LeafGrads(HashMap<usize, Tensor>);

impl LeafGrads {
    pub fn get(&self, v: Var<'_>) -> Option<&Tensor> {
        self.0.get(&v.id)
    }
}

impl Default for Tape {
    fn default() -> Self {
        Self::new()
    }
}

impl Tape {
    /// A tape that records for backward (training).
    pub fn new() -> Tape {
        Tape {
            nodes: RefCell::new(Vec::new()),
            params: RefCell::new(HashMap::new()),
            grad_enabled: true,
            used: false.into(),
            precision: Precision::F32.into(),
            rng_key: 0.into(),
            device_rng_key: None.into(),
        }
    }
    /// A tape that records nothing for backward (evaluation).
    pub fn inference() -> Tape {
        Tape { grad_enabled: false, ..Tape::new() }
    }
    /// Sets the GEMM input precision for ops recorded from now on.
    pub fn set_precision(&self, p: Precision) {
        self.precision.set(p);
    }
    pub fn precision(&self) -> Precision {
        self.precision.get()
    }
    /// Keys the dropout masks drawn on this tape (the trainer: seed, step, rank, micro-step);
    /// 0 until set.
    pub fn set_rng_key(&self, key: u64) {
        self.rng_key.set(key);
    }
    /// Where the GPU kernels read this tape's key from instead of their arguments: the same
    /// value (set with [`set_rng_key`](Self::set_rng_key)) staged in device memory, so that a
    /// CUDA graph of the step draws each replay's masks (see `ops::dropout::StepKeys`).
    pub fn set_device_rng_key(&self, key: Option<crate::ops::dropout::DeviceKey>) {
        *self.device_rng_key.borrow_mut() = key;
    }
    /// The mask of dropout site `site` with probability `p` on this tape (`None` when `p` is 0).
    pub fn dropout(&self, p: f64, site: u64) -> Result<Option<crate::ops::dropout::Dropout>> {
        let at = self.device_rng_key.borrow().as_ref().map(|k| k.at);
        Ok(crate::ops::dropout::Dropout::new(p, self.rng_key.get())?.map(|d| match at {
            Some(at) => d.site_on_device(site, at),
            None => d.site(site),
        }))
    }
    pub fn grad_enabled(&self) -> bool {
        self.grad_enabled
    }
    pub fn len(&self) -> usize {
        self.nodes.borrow().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push(&self, node: Node) -> Var<'_> {
        let mut n = self.nodes.borrow_mut();
        n.push(node);
        Var { tape: self, id: n.len() - 1 }
    }

    /// A constant input (no gradient).
    pub fn constant(&self, value: Tensor) -> Var<'_> {
        self.push(Node {
            name: "constant",
            value,
            inputs: vec![],
            requires_grad: false,
            backward: None,
            param: None,
            half: false,
            twin: None,
        })
    }
    /// A leaf that receives a gradient (returned by `backward` in [`LeafGrads`]).
    pub fn leaf(&self, value: Tensor) -> Var<'_> {
        self.push(Node {
            name: "leaf",
            value,
            inputs: vec![],
            requires_grad: self.grad_enabled,
            backward: None,
            param: None,
            half: false,
            twin: None,
        })
    }
    /// The parameter `id` of `store`, as a leaf whose gradient goes into the `GradStore`.
    /// Repeated calls return the same node, so a parameter has one gradient slot per pass.
    pub fn param(&self, store: &ParamStore, id: ParamId) -> Var<'_> {
        if let Some(&n) = self.params.borrow().get(&id) {
            return Var { tape: self, id: n };
        }
        let v = self.push(Node {
            name: "param",
            value: store.get(id),
            inputs: vec![],
            requires_grad: self.grad_enabled,
            backward: None,
            param: Some(id),
            half: false,
            twin: if self.precision() == Precision::Bf16 {
                store.want_half();
                store.half(id)
            } else {
                None
            },
        });
        self.params.borrow_mut().insert(id, v.id);
        v
    }

    /// Records an op's output. `backward` maps the output gradient to one optional gradient per
    /// input (same order as `inputs`); it is dropped unused when no input needs a gradient.
    pub fn record<'t>(
        &'t self,
        name: &'static str,
        value: Tensor,
        inputs: &[Var<'t>],
        backward: impl FnOnce(&Tensor) -> Result<Vec<Option<Tensor>>> + 'static,
    ) -> Var<'t> {
        let requires_grad = self.grad_enabled && inputs.iter().any(|v| v.requires_grad());
        let backward: Option<BackwardFn> = if requires_grad { Some(Box::new(backward)) } else { None };
        self.push(Node {
            name,
            value,
            inputs: inputs.iter().map(|v| v.id).collect(),
            requires_grad,
            backward,
            param: None,
            half: false,
            twin: None,
        })
    }

    /// Records an op that has no backward: if a gradient ever reaches it, `backward` fails
    /// naming the op.
    pub fn record_no_backward<'t>(&'t self, name: &'static str, value: Tensor, inputs: &[Var<'t>]) -> Var<'t> {
        let requires_grad = self.grad_enabled && inputs.iter().any(|v| v.requires_grad());
        self.push(Node {
            name,
            value,
            inputs: inputs.iter().map(|v| v.id).collect(),
            requires_grad,
            backward: None,
            param: None,
            half: false,
            twin: None,
        })
    }

    /// Backpropagates from the scalar `loss`. Parameter gradients are accumulated into `grads`
    /// (added to what is there since the last `zero_grad`); `on_final(id, grads)` fires once per
    /// parameter as soon as its gradient is complete, in backward order (parameters the loss does
    /// not depend on fire last, with a zero gradient). Returns gradients of `leaf` nodes.
    pub fn backward(&self, loss: Var<'_>, grads: &mut GradStore, mut on_final: impl FnMut(ParamId, &GradStore)) -> Result<LeafGrads> {
        if self.used.replace(true) {
            return Err(Error::Autograd("backward already ran on this tape".into()));
        }
        let mut nodes = self.nodes.borrow_mut();
        let lv = &nodes[loss.id].value;
        if lv.numel() != 1 {
            return Err(Error::Autograd(format!("loss must be a scalar, got shape {:?}", lv.shape())));
        }
        let n = nodes.len();
        // Remaining uses of each parameter node; a parameter is final when this reaches 0.
        let mut uses = vec![0usize; n];
        for node in nodes.iter() {
            for &i in &node.inputs {
                uses[i] += 1;
            }
        }
        let param_nodes: Vec<(usize, ParamId)> = nodes.iter().enumerate().filter_map(|(i, nd)| nd.param.map(|p| (i, p))).collect();
        let mut fired = vec![false; n];
        let mut pending: Vec<Option<Tensor>> = (0..n).map(|_| None).collect();
        pending[loss.id] = Some(crate::ops::elementwise::t::full_like(lv, 1.0)?);
        let mut leaf_grads = HashMap::new();
        for i in (0..n).rev() {
            let g = pending[i].take();
            let node = &mut nodes[i];
            let g = match g {
                Some(g) if node.half && g.dtype() == DType::F32 && !g.is_cuda() => {
                    Some(crate::ops::matmul::round_for(&g, Precision::Bf16)?)
                }
                g => g,
            };
            let inputs = node.inputs.clone();
            if let Some(g) = g.filter(|_| node.requires_grad) {
                if node.param.is_none() && node.inputs.is_empty() {
                    leaf_grads.insert(i, g);
                } else if !inputs.is_empty() {
                    let bw = node.backward.take().ok_or(Error::NoBackward(node.name))?;
                    let name = node.name;
                    // Offer each parameter input's gradient slot, and an intermediate's gradient
                    // already there to add into (once per input: one used twice by one op takes
                    // the ordinary path).
                    #[cfg(feature = "cuda")]
                    let sinks: Vec<Option<GradSink>> = inputs
                        .iter()
                        .map(|&inp| {
                            if !nodes[inp].requires_grad || inputs.iter().filter(|&&j| j == inp).count() != 1 {
                                return None;
                            }
                            match nodes[inp].param {
                                Some(p) => grads.sink(p),
                                None => activation_sink(pending[inp].as_mut()?, &nodes[inp].value),
                            }
                        })
                        .collect();
                    #[cfg(not(feature = "cuda"))]
                    let sinks: Vec<Option<GradSink>> = vec![];
                    let offered = sinks.iter().any(Option::is_some);
                    if offered {
                        SINKS.with(|s| *s.borrow_mut() = sinks);
                    }
                    let gi = bw(&g);
                    let taken: Vec<usize> = if offered {
                        SINKS.with(|s| s.borrow_mut().clear());
                        TAKEN.with(|t| std::mem::take(&mut *t.borrow_mut()))
                    } else {
                        vec![]
                    };
                    let gi = gi?;
                    if gi.len() != inputs.len() {
                        return Err(Error::Autograd(format!("{name}: backward returned {} grads for {} inputs", gi.len(), inputs.len())));
                    }
                    for &j in &taken {
                        if gi[j].is_some() {
                            return Err(Error::Autograd(format!("{name}: took input {j}'s gradient slot and returned a gradient too")));
                        }
                        if let Some(p) = nodes[inputs[j]].param {
                            grads.mark_written(p);
                        }
                    }
                    for (&inp, gin) in inputs.iter().zip(gi) {
                        let Some(gin) = gin else { continue };
                        let target = &nodes[inp];
                        if !target.requires_grad {
                            continue;
                        }
                        if gin.shape() != target.value.shape() {
                            return Err(Error::Autograd(format!(
                                "{name}: gradient of shape {:?} for input of shape {:?}",
                                gin.shape(),
                                target.value.shape()
                            )));
                        }
                        // A gradient is kept in its value's dtype (autocast's rule): an op that
                        // reads a bf16 activation through an f32 path returns an f32 gradient.
                        let gin = if gin.dtype() != target.value.dtype() { cast_to(&gin, target.value.dtype())? } else { gin };
                        if let Some(p) = target.param {
                            grads.accumulate(p, &gin)?;
                        } else {
                            match pending[inp].take() {
                                None => pending[inp] = Some(gin),
                                Some(acc) => pending[inp] = Some(add_in_place(acc, &gin)?),
                            }
                        }
                    }
                }
            } else {
                node.backward = None;
            }
            for &inp in &inputs {
                uses[inp] -= 1;
                if uses[inp] == 0 && !fired[inp] {
                    if let Some(p) = nodes[inp].param {
                        fired[inp] = true;
                        grads.finish_one(p)?;
                        on_final(p, grads);
                    }
                }
            }
        }
        grads.finish()?;
        for (i, p) in param_nodes {
            if !fired[i] {
                on_final(p, grads);
            }
        }
        Ok(LeafGrads(leaf_grads))
    }
}

/// The slot an op may add an intermediate's gradient contribution into (see [`GradSink`]): the
/// gradient accumulated so far, when it is an f32 GPU buffer of the value's shape that nothing
/// else holds — the op's write then is the accumulation, with no pass of its own.
#[cfg(feature = "cuda")]
fn activation_sink(acc: &mut Tensor, value: &Tensor) -> Option<GradSink> {
    if !acc.is_cuda() || acc.dtype() != DType::F32 || value.dtype() != DType::F32 || acc.shape() != value.shape() {
        return None;
    }
    if !crate::kernels::cuda::ops::dev_of(acc).ok()?.fusions().accumulate {
        return None;
    }
    if !acc.is_contiguous() || !acc.is_unique() {
        return None;
    }
    let ptr = crate::kernels::cuda::ops::ptr(acc).ok()?;
    Some(GradSink { ptr, len: acc.numel(), accumulate: true })
}

/// `t` in dtype `dt`, as a fallible conversion (a GPU cast can run out of memory).
fn cast_to(t: &Tensor, dt: DType) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if t.is_cuda() {
        return crate::kernels::cuda::ops::cast(t, dt);
    }
    Ok(t.to_dtype(dt))
}

/// `acc += g`, in place when `acc` owns its buffer, else into a new buffer.
fn add_in_place(mut acc: Tensor, g: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if acc.is_cuda() {
        use crate::kernels::cuda::ops as gpu;
        if acc.dtype() == DType::BF16 {
            // Two uses of a bf16 activation: summed in f32, rounded once.
            let sum = add_in_place(gpu::cast(&acc, DType::F32)?, &gpu::cast(g, DType::F32)?)?;
            return gpu::cast(&sum, DType::BF16);
        }
        if acc.is_contiguous() && acc.is_unique() {
            gpu::accumulate_raw(&*gpu::dev_of(&acc)?, gpu::ptr(&acc)?, g, acc.numel(), true)?;
            return Ok(acc);
        }
        return gpu::binary("add_f32", &acc, g);
    }
    let g = g.contiguous();
    macro_rules! go {
        ($t:ty) => {{
            if acc.is_contiguous() {
                if let Ok(a) = acc.data_mut::<$t>() {
                    crate::kernels::cpu::add_assign(a, g.data::<$t>()?);
                    return Ok(acc);
                }
            }
            crate::kernels::cpu::zip::<$t>(&acc, &g, |a, b| a + b)
        }};
    }
    match acc.dtype() {
        DType::F32 => go!(f32),
        DType::F64 => go!(f64),
        DType::BF16 => Err(Error::Msg("bf16 autograd is not supported on CPU".into())),
    }
}

impl<'t> Var<'t> {
    pub fn tape(&self) -> &'t Tape {
        self.tape
    }
    /// Marks this value a bf16 activation (autocast's rule; see `Var::linear_half`). On a GPU
    /// such values are bf16 tensors and this changes nothing; the CPU keeps them in f32,
    /// rounded to bf16 by the op that made them, and rounds their gradient here, so both
    /// engines compute the same numbers.
    pub fn mark_half(self) -> Var<'t> {
        self.tape.nodes.borrow_mut()[self.id].half = true;
        self
    }
    /// A parameter's bf16 copy (`ParamStore::half`) when the optimizer keeps one: what a bf16
    /// GEMM reads instead of casting the weight.
    pub fn half_twin(&self) -> Option<Tensor> {
        self.tape.nodes.borrow()[self.id].twin.clone()
    }
    /// Whether this value is a bf16 activation: a bf16 tensor, or marked as one on the CPU.
    pub fn is_half(&self) -> bool {
        let n = &self.tape.nodes.borrow()[self.id];
        n.half || n.value.dtype() == DType::BF16
    }
    pub fn id(&self) -> usize {
        self.id
    }
    /// The value (a cheap handle: shares storage).
    pub fn value(&self) -> Tensor {
        self.tape.nodes.borrow()[self.id].value.clone()
    }
    pub fn shape(&self) -> Vec<usize> {
        self.tape.nodes.borrow()[self.id].value.shape().to_vec()
    }
    pub fn dtype(&self) -> DType {
        self.tape.nodes.borrow()[self.id].value.dtype()
    }
    pub fn requires_grad(&self) -> bool {
        self.tape.nodes.borrow()[self.id].requires_grad
    }
    /// The value of a scalar.
    pub fn item(&self) -> Result<f64> {
        self.value().item()
    }
    /// Same value, cut from the graph.
    pub fn detach(&self) -> Var<'t> {
        self.tape.constant(self.value())
    }
}
