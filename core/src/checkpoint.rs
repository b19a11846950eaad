//! Checkpoint files: named tensors as safetensors (f32, little-endian; the format PyTorch users
//! load with `safetensors.torch.load_file`) and JSON metadata, each written atomically
//! (temp file in the same directory, fsync, rename, fsync of the directory) so a crash never
//! leaves a half-written checkpoint under the real name.

use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// Serialises named tensors (stored as f32) to safetensors bytes, in the given order.
pub fn tensors_to_bytes(named: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let bufs: Vec<(String, Vec<usize>, Vec<u8>)> = named
        .iter()
        .map(|(n, t)| {
            let v = t.to_vec::<f32>()?;
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            Ok((n.clone(), t.shape().to_vec(), bytes))
        })
        .collect::<Result<_>>()?;
    let views = bufs
        .iter()
        .map(|(n, s, b)| {
            Ok((n.as_str(), safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b).map_err(|e| Error::Msg(e.to_string()))?))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, None).map_err(|e| Error::Msg(format!("safetensors: {e}")))
}

/// Parses safetensors bytes (f32, f64 or bf16 tensors) into f32 tensors by name.
pub fn tensors_from_bytes(bytes: &[u8]) -> Result<HashMap<String, Tensor>> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| Error::Msg(format!("not a valid safetensors file ({e})")))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let d = view.data();
        let v: Vec<f32> = match view.dtype() {
            Dtype::F32 => d.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::F64 => d.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32).collect(),
            Dtype::BF16 => d.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => return Err(Error::Msg(format!("tensor `{name}` is {other:?}; expected F32, F64 or BF16"))),
        };
        out.insert(name, Tensor::from_vec(v, view.shape())?.to_dtype(DType::F32));
    }
    Ok(out)
}

/// Writes `bytes` to `path` atomically.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let file_name = path.file_name().ok_or_else(|| Error::file(path, "not a file path"))?;
    let tmp = dir.join(format!(".{}.tmp", file_name.to_string_lossy()));
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_read_back_and_bad_files_say_why() {
        let t = Tensor::from_vec(vec![1.0f32, -2.5], &[2]).unwrap();
        let bytes = tensors_to_bytes(&[("w".into(), t)]).unwrap();
        assert_eq!(tensors_from_bytes(&bytes).unwrap()["w"].to_vec::<f32>().unwrap(), [1.0, -2.5]);
        let e = tensors_from_bytes(&bytes[..bytes.len() - 1]).unwrap_err().to_string();
        assert!(e.starts_with("not a valid safetensors file ("), "{e}");
        let ints = [7i32, 8].iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let view = safetensors::tensor::TensorView::new(Dtype::I32, vec![2], &ints).unwrap();
        let bytes = safetensors::serialize([("ids", view)], None).unwrap();
        assert_eq!(tensors_from_bytes(&bytes).unwrap_err().to_string(), "tensor `ids` is I32; expected F32, F64 or BF16");
    }
}
