//! `dptrain-models`: the models dptrain trains, written on the engine in `dptrain-core`.
//! Each declares its parameters (PyTorch-style dotted names, μP roles) into a `ParamBuilder`
//! and implements `Model::loss`, recording instability probes into the given sink.

pub mod gpt;
pub mod mlp;
pub mod nn;
pub mod probes;
pub mod resnet;

pub use gpt::{Gpt, GptConfig};
pub use mlp::{Mlp, MlpConfig};
pub use nn::NormKind;
pub use resnet::{ResNet, ResNetConfig};
