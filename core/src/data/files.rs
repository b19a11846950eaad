//! File formats: UTF-8 text (byte-level tokens), nanoGPT `.bin` token files (flat little-endian
//! uint16), and NumPy `.npy` arrays for images and labels. Each loader checks the file fully
//! and fails with an error naming the file and what was expected (never a panic).

use super::ImageSet;
use crate::error::{Error, Result};
use std::path::Path;

/// The whole file. Only a regular file: a device or a pipe would be read until memory ran out
/// (`/dev/zero`), or block (a FIFO nobody writes).
fn read(path: &Path) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::file(path, format!("cannot read ({e})")))?;
    if !meta.is_file() {
        let what = if meta.is_dir() { "a directory" } else { "not a regular file (a device, pipe or socket)" };
        return Err(Error::file(path, format!("is {what}; expected a data file")));
    }
    std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read ({e})")))
}

/// A UTF-8 text file as byte tokens (vocabulary 256).
pub fn load_text(path: &Path) -> Result<Vec<u32>> {
    let bytes = read(path)?;
    if let Err(e) = std::str::from_utf8(&bytes) {
        return Err(Error::file(path, format!("not valid UTF-8 text (invalid byte at offset {})", e.valid_up_to())));
    }
    if bytes.len() < 2 {
        return Err(Error::file(path, "text file is empty; expected at least 2 bytes"));
    }
    Ok(bytes.into_iter().map(u32::from).collect())
}

/// A flat little-endian uint16 token file (nanoGPT's `train.bin`).
pub fn load_tokens_u16(path: &Path) -> Result<Vec<u32>> {
    let bytes = read(path)?;
    if bytes.len() % 2 != 0 {
        return Err(Error::file(path, format!("truncated token file: {} bytes is not a whole number of uint16 tokens", bytes.len())));
    }
    if bytes.len() < 4 {
        return Err(Error::file(path, "token file holds fewer than 2 tokens"));
    }
    Ok(bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32).collect())
}

/// A parsed `.npy` array: shape and values (as f64).
#[derive(Debug)]
pub struct Npy {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

fn header_field<'a>(h: &'a str, key: &str) -> Option<&'a str> {
    let i = h.find(&format!("'{key}'"))?;
    let rest = h[i + key.len() + 2..].trim_start().strip_prefix(':')?.trim_start();
    Some(rest)
}

/// Reads a C-order `.npy` file of dtype f4, f8, u1, i4 or i8 (little-endian).
pub fn load_npy(path: &Path) -> Result<Npy> {
    let b = read(path)?;
    let bad = |m: &str| Error::file(path, m.to_string());
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy file (missing \\x93NUMPY magic)"));
    }
    let (hlen, start) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 if b.len() >= 12 => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
        v => return Err(bad(&format!("unsupported .npy version {v}"))),
    };
    let header = b.get(start..start + hlen).ok_or_else(|| bad("truncated .npy header"))?;
    let h = std::str::from_utf8(header).map_err(|_| bad("unreadable .npy header"))?;
    let descr = header_field(h, "descr")
        .and_then(|r| r.strip_prefix('\''))
        .and_then(|r| r.split('\'').next())
        .ok_or_else(|| bad("no dtype in .npy header"))?;
    if header_field(h, "fortran_order").is_some_and(|r| r.starts_with("True")) {
        return Err(bad("Fortran-order arrays are not supported; save with np.ascontiguousarray"));
    }
    let shape_s = header_field(h, "shape")
        .and_then(|r| r.strip_prefix('('))
        .and_then(|r| r.split(')').next())
        .ok_or_else(|| bad("no shape in .npy header"))?;
    let shape: Vec<usize> = shape_s
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| bad("bad shape in .npy header")))
        .collect::<Result<_>>()?;
    let n: usize = shape.iter().product();
    let (size, conv): (usize, fn(&[u8]) -> f64) = match descr {
        "<f4" => (4, |c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64),
        "<f8" => (8, |c| f64::from_le_bytes(c.try_into().expect("8 bytes"))),
        "|u1" => (1, |c| c[0] as f64),
        "<i4" => (4, |c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64),
        "<i8" => (8, |c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f64),
        d => return Err(bad(&format!("unsupported dtype {d}; expected <f4, <f8, |u1, <i4 or <i8"))),
    };
    let body = &b[start + hlen..];
    if body.len() != n * size {
        return Err(bad(&format!(
            "truncated or oversized data: {} bytes for shape {:?} of {descr} (expected {})",
            body.len(),
            shape,
            n * size
        )));
    }
    Ok(Npy { shape, data: body.chunks_exact(size).map(conv).collect() })
}

/// Images `[N, H, W]`, `[N, C, H, W]` or `[N, D]` and integer labels `[N]` from two `.npy` files.
pub fn load_npy_images(images: &Path, labels: &Path) -> Result<ImageSet> {
    let x = load_npy(images)?;
    let y = load_npy(labels)?;
    let shape = match x.shape[..] {
        [_, d] => [1, 1, d],
        [_, h, w] => [1, h, w],
        [_, c, h, w] => [c, h, w],
        _ => return Err(Error::file(images, format!("images must be [N, D], [N, H, W] or [N, C, H, W], got {:?}", x.shape))),
    };
    if y.shape.len() != 1 || y.shape[0] != x.shape[0] {
        return Err(Error::file(labels, format!("labels must be [{}] to match the images, got {:?}", x.shape[0], y.shape)));
    }
    if x.shape[0] == 0 {
        return Err(Error::file(images, "no samples"));
    }
    let labels_u: Vec<u32> = y
        .data
        .iter()
        .map(|&v| {
            if v >= 0.0 && v.fract() == 0.0 && v < u32::MAX as f64 {
                Ok(v as u32)
            } else {
                Err(Error::file(labels, format!("label {v} is not a class id (an integer from 0 to {})", u32::MAX - 1)))
            }
        })
        .collect::<Result<_>>()?;
    Ok(ImageSet { pixels: x.data.iter().map(|&v| v as f32).collect(), labels: labels_u, shape })
}

/// Writes a C-order `<f4` or `<i8` `.npy` (tests and tools use it to make fixtures).
pub fn write_npy(path: &Path, shape: &[usize], data: &[f64], int: bool) -> Result<()> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_s = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut h = format!("{{'descr': '{}', 'fortran_order': False, 'shape': {shape_s}, }}", if int { "<i8" } else { "<f4" });
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((h.len() as u16).to_le_bytes());
    out.extend(h.as_bytes());
    for &v in data {
        if int {
            out.extend((v as i64).to_le_bytes());
        } else {
            out.extend((v as f32).to_le_bytes());
        }
    }
    std::fs::write(path, out).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("dptrain-files-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d.join(name)
    }

    #[test]
    fn text_and_tokens() {
        let p = tmp("a.txt");
        std::fs::write(&p, "héllo").unwrap();
        assert_eq!(load_text(&p).unwrap().len(), 6);
        std::fs::write(&p, [0x66, 0xff, 0x66]).unwrap();
        assert!(load_text(&p).unwrap_err().to_string().contains("UTF-8"));
        let t = tmp("t.bin");
        std::fs::write(&t, [1, 0, 2, 1, 255, 255]).unwrap();
        assert_eq!(load_tokens_u16(&t).unwrap(), vec![1, 258, 65535]);
        std::fs::write(&t, [1, 0, 2]).unwrap();
        let e = load_tokens_u16(&t).unwrap_err().to_string();
        assert!(e.contains("t.bin") && e.contains("truncated"), "{e}");
        assert!(load_tokens_u16(&tmp("missing.bin")).unwrap_err().to_string().contains("missing.bin"));
        // Not regular files: refused before reading (/dev/zero would fill the memory).
        let e = load_text(Path::new("/dev/zero")).unwrap_err().to_string();
        assert_eq!(e, "/dev/zero: is not a regular file (a device, pipe or socket); expected a data file");
        let e = load_tokens_u16(&std::env::temp_dir()).unwrap_err().to_string();
        assert!(e.ends_with(": is a directory; expected a data file"), "{e}");
    }

    #[test]
    fn npy_roundtrip_and_errors() {
        let (x, y) = (tmp("x.npy"), tmp("y.npy"));
        let data: Vec<f64> = (0..24).map(|v| v as f64 * 0.5).collect();
        write_npy(&x, &[2, 3, 4], &data, false).unwrap();
        write_npy(&y, &[2], &[1.0, 0.0], true).unwrap();
        let set = load_npy_images(&x, &y).unwrap();
        assert_eq!(set.shape, [1, 3, 4]);
        assert_eq!(set.labels, vec![1, 0]);
        assert_eq!(set.pixels[23], 11.5);
        // truncate the image file
        let b = std::fs::read(&x).unwrap();
        std::fs::write(&x, &b[..b.len() - 3]).unwrap();
        let e = load_npy_images(&x, &y).unwrap_err().to_string();
        assert!(e.contains("x.npy") && e.contains("truncated"), "{e}");
        write_npy(&x, &[3, 3, 4], &(0..36).map(|v| v as f64).collect::<Vec<_>>(), false).unwrap();
        assert!(load_npy_images(&x, &y).unwrap_err().to_string().contains("y.npy"));
        std::fs::write(&x, b"not numpy").unwrap();
        assert!(load_npy(&x).unwrap_err().to_string().contains("magic"));
    }
}
