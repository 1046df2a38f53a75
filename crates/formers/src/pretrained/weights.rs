//! A checkpoint's weights: its `model.safetensors` mapped into memory as the [`Source`] of
//! parameters the model is built from. Each tensor the model asks for is copied straight
//! out of the map under its family's name, and nothing is initialised. What the model needs and the file lacks, and what the file holds and the
//! model leaves unused, are both recorded for one report.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor, Var, WithDType};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::kernels::blockq::{BlockKind, BlockMatrix, BLOCK};
use crate::kernels::int8::Int8Matrix;
use crate::kernels::quant::QuantMatrix;
use crate::limits::Limits;
use crate::params::Source;
use crate::{Error, Result};

/// How one formers parameter is read from a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Take {
    /// The checkpoint's name for it, without the family's prefix.
    pub name: String,
    /// Stored `[in, out]` (GPT-2's `Conv1D`): transposed to formers' `[out, in]`.
    pub transpose: bool,
    /// Slice `i` of `n` equal ones along the first formers dimension (GPT-2's fused `c_attn`).
    pub part: Option<(usize, usize)>,
}

impl Take {
    /// The tensor `name`, as stored.
    pub fn same(name: impl Into<String>) -> Self {
        Take {
            name: name.into(),
            transpose: false,
            part: None,
        }
    }

    /// The shape the checkpoint stores for a formers parameter of `shape`.
    fn stored_shape(&self, shape: &[usize]) -> Vec<usize> {
        let mut s = shape.to_vec();
        if let (Some((_, n)), Some(first)) = (self.part, s.first_mut()) {
            *first *= n;
        }
        if self.transpose {
            s.reverse();
        }
        s
    }
}

/// A family's naming: the prefix some checkpoints put before every name, formers name →
/// how to read it, and the stored tensors that are known to be safe to leave unused.
#[derive(Debug, Clone, Copy)]
pub struct Naming {
    /// The family's name in messages.
    pub family: &'static str,
    /// Dropped from stored names that start with it (`bert.`, `transformer.`).
    pub prefix: &'static str,
    /// Formers parameter name → how to read it; `None` for a name the family lacks.
    pub take: fn(&str) -> Option<Take>,
    /// Whether a stored name (prefix dropped) may be left unused without a warning.
    pub harmless: fn(&str) -> bool,
    /// Formers config keys → the family's `config.json` keys, for messages.
    pub keys: &'static [(&'static str, &'static str)],
}

/// The suffix of the name of a quantised tensor's scales (`{name}_scale`, F32): `[rows]`
/// for int8 (one per row), `[rows, blocks]` for Q8_0 (I8 codes) and Q4_0 (U8, two codes a
/// byte).
pub const INT8_SCALE: &str = "_scale";

/// Bytes copied (then released from this process) at a time.
const CHUNK: usize = 1 << 20;

#[derive(Debug)]
struct Entry {
    /// The name in the file (with its prefix, if any).
    stored: String,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range in the map.
    start: usize,
    end: usize,
}

#[derive(Debug, Default)]
struct Log {
    taken: BTreeSet<String>,
    /// Checkpoint names the file lacks, each with the formers parameters that need it.
    missing: Vec<(String, Vec<String>)>,
    /// Formers parameters the family has no name for.
    unmapped: Vec<String>,
    /// Values of the zero stand-ins handed out for missing tensors.
    stand_in: u128,
}

impl Log {
    fn lacks(&mut self, stored: &str, ours: &str) {
        match self.missing.iter_mut().find(|(s, _)| s == stored) {
            Some((_, needed_by)) => needed_by.push(ours.to_string()),
            None => self
                .missing
                .push((stored.to_string(), vec![ours.to_string()])),
        }
    }
}

/// Names as a list of `a`, `b` (the first `SHOWN`, then how many more).
fn list(names: impl ExactSizeIterator<Item = String>) -> String {
    const SHOWN: usize = 12;
    let n = names.len();
    let mut out = names.take(SHOWN).collect::<Vec<_>>().join(", ");
    if n > SHOWN {
        out.push_str(&format!(" and {} more", n - SHOWN));
    }
    out
}

/// A mapped `model.safetensors`, read through a family's [`Naming`].
#[derive(Debug)]
pub struct Weights {
    path: PathBuf,
    map: Mmap,
    /// By name without the prefix.
    entries: HashMap<String, Entry>,
    naming: Naming,
    log: Mutex<Log>,
    /// Values the file holds (all tensors).
    stored: u128,
    limits: Limits,
}

impl Weights {
    /// Maps `path` and reads its header (checked against the file size; no tensor is read).
    pub fn open(path: &Path, naming: Naming) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; as with any mapped file, it must not be truncated or
        // rewritten while formers loads it.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (n, meta) = SafeTensors::read_metadata(&map).map_err(|e| Error::Checkpoint {
            path: path.to_path_buf(),
            msg: format!("not a valid safetensors file ({e})"),
        })?;
        let data = 8 + n;
        let mut entries = HashMap::new();
        let mut total = 0u128;
        for (stored, info) in meta.tensors() {
            let key = match stored.strip_prefix(naming.prefix) {
                Some(short) if !naming.prefix.is_empty() => short.to_string(),
                _ => stored.clone(),
            };
            let entry = Entry {
                stored,
                dtype: info.dtype,
                shape: info.shape.clone(),
                start: data + info.data_offsets.0,
                end: data + info.data_offsets.1,
            };
            total = total.saturating_add(info.shape.iter().map(|&n| n as u128).product());
            entries.insert(key, entry);
        }
        Ok(Weights {
            path: path.to_path_buf(),
            map,
            entries,
            naming,
            log: Mutex::default(),
            stored: total,
            limits: Limits::default(),
        })
    }

    /// The same weights read under `limits` (whether non-finite weights load).
    pub fn with_limits(self, limits: Limits) -> Self {
        Weights { limits, ..self }
    }

    fn err(&self, msg: String) -> Error {
        Error::Checkpoint {
            path: self.path.clone(),
            msg,
        }
    }

    fn log(&self) -> MutexGuard<'_, Log> {
        self.log.lock().expect("weights log poisoned")
    }

    /// The entry `name` (or its `gamma` / `beta` alias, as old BERT checkpoints name norms).
    fn find(&self, name: &str) -> Option<(&str, &Entry)> {
        let alias = name
            .strip_suffix(".weight")
            .map(|s| format!("{s}.gamma"))
            .or_else(|| name.strip_suffix(".bias").map(|s| format!("{s}.beta")));
        let found = [Some(name), alias.as_deref()]
            .into_iter()
            .flatten()
            .find_map(|k| self.entries.get_key_value(k));
        found.map(|(k, e)| (k.as_str(), e))
    }

    /// The values of `e` as `T`, copied a chunk at a time; each chunk's pages leave this
    /// process's memory once copied, so the map never adds to the peak.
    fn values<T: WithDType>(&self, e: &Entry, dtype: DType) -> Result<Vec<T>> {
        let elem = dtype.size_in_bytes();
        let mut out = Vec::with_capacity((e.end - e.start) / elem);
        let mut at = e.start;
        while at < e.end {
            let len = CHUNK.min(e.end - at);
            let bytes = &self.map[at..at + len];
            let t = Tensor::from_raw_buffer(bytes, dtype, &[len / elem], &Device::Cpu)?;
            let done = out.len();
            out.extend(t.to_dtype(T::DTYPE)?.to_vec1::<T>()?);
            self.limits
                .check_finite(&out[done..], done, &e.stored, &self.path)?;
            self.release(at, len);
            at += len;
        }
        Ok(out)
    }

    #[cfg(unix)]
    fn release(&self, offset: usize, len: usize) {
        // SAFETY: the map is shared and read-only, so dropping its pages loses nothing: a
        // later read faults them back in from the file (the page cache keeps them).
        let advice = memmap2::UncheckedAdvice::DontNeed;
        let _ = unsafe { self.map.unchecked_advise_range(advice, offset, len) };
    }

    #[cfg(not(unix))]
    fn release(&self, _offset: usize, _len: usize) {}

    /// `e` read as `take` says, as a variable of formers `shape`.
    fn load<T: WithDType>(
        &self,
        e: &Entry,
        take: &Take,
        shape: &[usize],
        device: &Device,
    ) -> Result<Var> {
        if matches!(e.dtype, Dtype::I8 | Dtype::U8) {
            if take.transpose || take.part.is_some() {
                return Err(self.err(format!(
                    "tensor `{}`: quantised tensors are read from formers model directories only",
                    e.stored
                )));
            }
            let [rows, cols] = shape[..] else {
                return Err(self.err(format!(
                    "tensor `{}`: quantised tensors are matrices, the model wants shape {shape:?}",
                    e.stored
                )));
            };
            let q = self.quantized(e, [rows, cols])?;
            let v: Vec<T> = match &q {
                // Dequantised straight into the variable's one buffer: a table's f32 copy
                // is the largest allocation of loading, made once.
                QuantMatrix::Int8(q) => {
                    let cols = q.cols.max(1);
                    q.data
                        .iter()
                        .enumerate()
                        .map(|(i, &x)| T::from_f64((q.scales[i / cols] * f32::from(x)) as f64))
                        .collect()
                }
                QuantMatrix::Block(q) => q
                    .dequantize()
                    .into_iter()
                    .map(|x| T::from_f64(x as f64))
                    .collect(),
            };
            return Ok(Var::from_vec(v, shape, device)?);
        }
        let stored = match e.dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::F64 => DType::F64,
            other => {
                return Err(self.err(format!(
                    "tensor `{}`: expected a floating-point dtype (F32, F16, BF16, F64), found {other:?}",
                    e.stored
                )))
            }
        };
        let v = self.values::<T>(e, stored)?;
        if !take.transpose && take.part.is_none() {
            return Ok(Var::from_vec(v, shape, device)?);
        }
        let mut t = Tensor::from_vec(v, e.shape.as_slice(), device)?;
        if take.transpose {
            t = t.t()?;
        }
        if let Some((i, n)) = take.part {
            let rows = t.dim(0)? / n;
            t = t.narrow(0, i * rows, rows)?;
        }
        Ok(Var::from_tensor(&t)?)
    }

    /// The quantised matrix `e` of formers shape `want` and its scales (the tensor
    /// `{name}_scale`, marked taken): int8 when the scales are `[rows]`, Q8_0 or Q4_0 (by
    /// the codes' dtype) when they are `[rows, blocks]`.
    fn quantized(&self, e: &Entry, want: [usize; 2]) -> Result<QuantMatrix> {
        let [rows, width] = e.shape[..] else {
            return Err(self.err(format!(
                "tensor `{}`: quantised tensors are matrices, found shape {:?}",
                e.stored, e.shape
            )));
        };
        if rows != want[0] {
            return Err(self.err(format!(
                "tensor `{}`: expected a quantised matrix of shape {want:?}, found {:?}",
                e.stored, e.shape
            )));
        }
        let cols = want[1];
        let scale_name = format!("{}{INT8_SCALE}", e.stored);
        let key = scale_name
            .strip_prefix(self.naming.prefix)
            .filter(|_| !self.naming.prefix.is_empty())
            .unwrap_or(&scale_name);
        let s = self.entries.get(key).ok_or_else(|| {
            self.err(format!(
                "tensor `{}` is int8 but its scales `{scale_name}` are missing",
                e.stored
            ))
        })?;
        let blocks = cols.div_ceil(BLOCK);
        let kind = match (e.dtype, &s.shape[..]) {
            (Dtype::I8, [r]) if *r == rows => None,
            (Dtype::I8, [r, b]) if *r == rows && *b == blocks => Some(BlockKind::Q8_0),
            (Dtype::U8, [r, b]) if *r == rows && *b == blocks => Some(BlockKind::Q4_0),
            _ => {
                return Err(self.err(format!(
                    "tensor `{scale_name}`: expected F32 of shape [{rows}] (int8) or \
                     [{rows}, {blocks}] (q8_0, q4_0), found {:?} of shape {:?}",
                    s.dtype, s.shape
                )))
            }
        };
        let expected = kind.map_or(cols, |k| blocks * k.block_bytes());
        if s.dtype != Dtype::F32 || width != expected {
            return Err(self.err(format!(
                "tensor `{}`: expected {} codes of shape [{rows}, {expected}] with F32 scales \
                 `{scale_name}`, found {:?} of shape {:?} (scales {:?})",
                e.stored,
                kind.map_or("int8", BlockKind::name),
                e.dtype,
                e.shape,
                s.dtype
            )));
        }
        self.log().taken.insert(key.to_string());
        let bytes = self.map[e.start..e.end].to_vec();
        self.release(e.start, e.end - e.start);
        let scales = self.values::<f32>(s, DType::F32)?;
        let q = match kind {
            None => {
                let data = bytes.into_iter().map(|b| b as i8).collect();
                Int8Matrix::from_parts(rows, cols, data, scales).map(QuantMatrix::Int8)
            }
            Some(k) => {
                BlockMatrix::from_parts(k, rows, cols, bytes, scales).map(QuantMatrix::Block)
            }
        };
        q.map_err(|err| self.err(format!("tensor `{}`: {err}", e.stored)))
    }

    /// Checkpoint tensors the model did not take, leaving out the family's harmless ones.
    fn unused(&self) -> Vec<String> {
        let log = self.log();
        let mut out: Vec<String> = self
            .entries
            .iter()
            .filter(|(k, _)| !log.taken.contains(*k) && !(self.naming.harmless)(k))
            .map(|(_, e)| e.stored.clone())
            .collect();
        out.sort();
        out
    }

    /// After the model is built: an error naming every tensor it needed and the file
    /// lacks, or the names of the tensors it left unused.
    pub fn finish(&self) -> Result<Vec<String>> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(self.unused())
        } else {
            Err(self.err(problems.join("; ")))
        }
    }

    /// What the model needed and the file lacks (the log is emptied).
    fn problems(&self) -> Vec<String> {
        let (missing, unmapped) = {
            let mut log = self.log();
            (
                std::mem::take(&mut log.missing),
                std::mem::take(&mut log.unmapped),
            )
        };
        let mut problems = Vec::new();
        if !missing.is_empty() {
            let n = missing.len();
            let names = missing.into_iter().map(|(stored, needed_by)| {
                let ours: Vec<String> = needed_by.iter().map(|o| format!("`{o}`")).collect();
                format!("`{stored}` (for formers {})", ours.join(", "))
            });
            let s = if n == 1 { "" } else { "s" };
            problems.push(format!("{n} tensor{s} missing: {}", list(names)));
        }
        if !unmapped.is_empty() {
            let names = unmapped.into_iter().map(|o| format!("`{o}`"));
            problems.push(format!(
                "no {} tensor corresponds to formers {}",
                self.naming.family,
                list(names)
            ));
        }
        problems
    }
}

impl Source for Weights {
    fn take_quantized(&self, name: &str, shape: [usize; 2]) -> Result<Option<QuantMatrix>> {
        let Some(take) = (self.naming.take)(name) else {
            return Ok(None);
        };
        let Some((key, e)) = self.find(&take.name) else {
            return Ok(None);
        };
        if !matches!(e.dtype, Dtype::I8 | Dtype::U8) {
            return Ok(None);
        }
        if take.transpose || take.part.is_some() {
            return Err(self.err(format!(
                "tensor `{}`: quantised tensors are read from formers model directories only",
                e.stored
            )));
        }
        let q = self.quantized(e, shape)?;
        self.log().taken.insert(key.to_string());
        Ok(Some(q))
    }

    fn take(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Var> {
        let Some(take) = (self.naming.take)(name) else {
            self.log().unmapped.push(name.to_string());
            return Ok(Var::zeros(shape, dtype, device)?);
        };
        let Some((key, e)) = self.find(&take.name) else {
            let mut log = self.log();
            log.lacks(&take.name, name);
            // Stand-ins let every missing tensor be named at once, but a config that asks
            // for more than the file holds describes another model: stop before its size
            // is allocated.
            let values = shape.iter().map(|&n| n as u128).product::<u128>();
            log.stand_in = log.stand_in.saturating_add(values);
            if log.stand_in > self.stored {
                drop(log);
                return Err(self.err(format!(
                    "config.json describes a larger model than this file's {} values; {}",
                    self.stored,
                    self.problems().join("; ")
                )));
            }
            drop(log);
            return Ok(Var::zeros(shape, dtype, device)?);
        };
        self.log().taken.insert(key.to_string());
        let want = take.stored_shape(shape);
        // Block-quantised codes are wider or narrower than their matrix: `quantized`
        // checks their shape against the scales.
        let block_codes = matches!(e.dtype, Dtype::I8 | Dtype::U8) && e.shape.len() == 2;
        let same = if block_codes {
            want.len() == 2 && e.shape[0] == want[0]
        } else {
            e.shape == want
        };
        if !same {
            return Err(self.err(format!(
                "tensor `{}`: expected shape {want:?}, found {:?}",
                e.stored, e.shape
            )));
        }
        match dtype {
            DType::F64 => self.load::<f64>(e, &take, shape, device),
            DType::F32 => self.load::<f32>(e, &take, shape, device),
            other => {
                let v = self.load::<f32>(e, &take, shape, device)?;
                Ok(Var::from_tensor(&v.as_tensor().to_dtype(other)?)?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candle_core::{DType, Device};

    use super::*;
    use crate::model::Model;
    use crate::params::Params;
    use crate::pretrained::{Family, FAMILIES};

    /// Every parameter of the model built from `family`'s fixture equals its checkpoint
    /// tensor bit for bit (after GPT-2's transpose and split): nothing was drawn or
    /// initialised.
    fn params_are_the_files_tensors(family: &dyn Family) {
        let dir = crate::fuzzing::fixture_dir(family);
        let hf = crate::pretrained::read_json(&dir.join("config.json")).unwrap();
        let cfg = family.config(&hf, &dir).unwrap();
        let naming = family.naming();
        let path = dir.join("model.safetensors");
        let weights = Arc::new(Weights::open(&path, naming).unwrap());
        let params = Params::from_source(weights.clone(), DType::F32, &Device::Cpu);
        Model::new(&cfg, &params.frozen()).unwrap();
        assert!(weights.finish().unwrap().is_empty());
        let file = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let vars = params.vars();
        assert!(vars.len() > 20, "{}", vars.len());
        for (ours, var) in vars {
            let take = (naming.take)(&ours).unwrap();
            let stored = file
                .get(&take.name)
                .or_else(|| file.get(&format!("{}{}", naming.prefix, take.name)))
                .unwrap();
            let mut want = stored.clone();
            if take.transpose {
                want = want.t().unwrap();
            }
            if let Some((i, n)) = take.part {
                let rows = want.dim(0).unwrap() / n;
                want = want.narrow(0, i * rows, rows).unwrap();
            }
            let got = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>();
            let want = want.flatten_all().unwrap().to_vec1::<f32>();
            assert_eq!(got.unwrap(), want.unwrap(), "{} {ours}", family.name());
        }
    }

    /// BERT's tensors as stored; GPT-2's transposed and split.
    #[test]
    fn every_familys_parameters_are_its_checkpoints_tensors() {
        assert!(FAMILIES.len() >= 2);
        for family in FAMILIES {
            params_are_the_files_tensors(*family);
        }
    }

    #[test]
    fn stored_shape_undoes_transpose_and_split() {
        let t = Take {
            name: "c_attn.weight".into(),
            transpose: true,
            part: Some((1, 3)),
        };
        assert_eq!(t.stored_shape(&[4, 6]), [6, 12]);
        assert_eq!(Take::same("b").stored_shape(&[5]), [5]);
    }
}
