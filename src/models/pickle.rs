//! A restricted unpickler for PyTorch checkpoints: it interprets the pickle opcodes PyTorch's
//! `torch.save` emits as plain data and never runs code. Only a fixed list of globals is
//! recognised (OrderedDict, the tensor-rebuild functions, typed storages); any other global,
//! opcode or callable is an error naming it, so a malicious file cannot do anything.

use std::collections::HashMap;

use anyhow::{Result, bail};

/// Element types of PyTorch storages (the `torch.XStorage` globals).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageKind {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl StorageKind {
    fn from_global(name: &str) -> Option<Self> {
        Some(match name {
            "torch.DoubleStorage" => StorageKind::F64,
            "torch.FloatStorage" => StorageKind::F32,
            "torch.HalfStorage" => StorageKind::F16,
            "torch.BFloat16Storage" => StorageKind::BF16,
            "torch.LongStorage" => StorageKind::I64,
            "torch.IntStorage" => StorageKind::I32,
            "torch.ShortStorage" => StorageKind::I16,
            "torch.CharStorage" => StorageKind::I8,
            "torch.ByteStorage" => StorageKind::U8,
            "torch.BoolStorage" => StorageKind::Bool,
            _ => return None,
        })
    }

    pub fn kind(self) -> tch::Kind {
        match self {
            StorageKind::F64 => tch::Kind::Double,
            StorageKind::F32 => tch::Kind::Float,
            StorageKind::F16 => tch::Kind::Half,
            StorageKind::BF16 => tch::Kind::BFloat16,
            StorageKind::I64 => tch::Kind::Int64,
            StorageKind::I32 => tch::Kind::Int,
            StorageKind::I16 => tch::Kind::Int16,
            StorageKind::I8 => tch::Kind::Int8,
            StorageKind::U8 => tch::Kind::Uint8,
            StorageKind::Bool => tch::Kind::Bool,
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            StorageKind::F64 | StorageKind::I64 => 8,
            StorageKind::F32 | StorageKind::I32 => 4,
            StorageKind::F16 | StorageKind::BF16 | StorageKind::I16 => 2,
            StorageKind::I8 | StorageKind::U8 | StorageKind::Bool => 1,
        }
    }
}

/// A tensor as described by the pickle; its bytes are in the archive's `data/<key>` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub key: String,
    pub kind: StorageKind,
    pub storage_numel: usize,
    pub offset: i64,
    pub size: Vec<i64>,
    pub stride: Vec<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// Insertion-ordered (OrderedDict and plain dicts alike).
    Dict(Vec<(Value, Value)>),
    /// A recognised global (function or class), by `module.name`.
    Global(String),
    Storage {
        key: String,
        kind: StorageKind,
        numel: usize,
    },
    Tensor(TensorRef),
}

const ALLOWED_GLOBALS: &[&str] = &[
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
];

/// Interprets `bytes` (a `data.pkl`) as data.
pub fn load(bytes: &[u8]) -> Result<Value> {
    let mut stack: Vec<Value> = Vec::new();
    let mut marks: Vec<usize> = Vec::new();
    let mut memo: HashMap<u32, Value> = HashMap::new();
    let mut pos = 0usize;
    let take = |pos: &mut usize, n: usize| -> Result<&[u8]> {
        if *pos + n > bytes.len() {
            bail!(
                "pickle ends in the middle of an instruction at byte {}",
                *pos
            );
        }
        let s = &bytes[*pos..*pos + n];
        *pos += n;
        Ok(s)
    };
    let pop = |stack: &mut Vec<Value>| {
        stack
            .pop()
            .ok_or_else(|| anyhow::anyhow!("pickle stack underflow"))
    };
    let pop_mark = |stack: &mut Vec<Value>, marks: &mut Vec<usize>| -> Result<Vec<Value>> {
        let m = marks
            .pop()
            .ok_or_else(|| anyhow::anyhow!("pickle: MARK expected"))?;
        if m > stack.len() {
            bail!("pickle: corrupt MARK");
        }
        Ok(stack.split_off(m))
    };
    loop {
        let op = take(&mut pos, 1)?[0];
        match op {
            0x80 => {
                let proto = take(&mut pos, 1)?[0];
                if proto > 5 {
                    bail!("pickle protocol {proto} is not supported");
                }
            }
            0x95 => {
                take(&mut pos, 8)?; // FRAME: length only
            }
            b'.' => return pop(&mut stack),
            b'(' => marks.push(stack.len()),
            b'}' => stack.push(Value::Dict(Vec::new())),
            b']' => stack.push(Value::List(Vec::new())),
            b')' => stack.push(Value::Tuple(Vec::new())),
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Bool(true)),
            0x89 => stack.push(Value::Bool(false)),
            b'K' => stack.push(Value::Int(take(&mut pos, 1)?[0] as i64)),
            b'M' => {
                let b = take(&mut pos, 2)?;
                stack.push(Value::Int(u16::from_le_bytes([b[0], b[1]]) as i64));
            }
            b'J' => {
                let b = take(&mut pos, 4)?;
                stack.push(Value::Int(
                    i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64
                ));
            }
            0x8a => {
                let n = take(&mut pos, 1)?[0] as usize;
                let b = take(&mut pos, n)?;
                if n > 8 {
                    bail!("pickle: integer of {n} bytes is too large");
                }
                let mut v: i64 = 0;
                for (i, &byte) in b.iter().enumerate() {
                    v |= (byte as i64) << (8 * i);
                }
                if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n); // sign-extend
                }
                stack.push(Value::Int(v));
            }
            b'G' => {
                let b = take(&mut pos, 8)?;
                stack.push(Value::Float(f64::from_be_bytes(
                    b.try_into().expect("8 bytes"),
                )));
            }
            b'X' => {
                let b = take(&mut pos, 4)?;
                let n = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
                stack.push(Value::Str(
                    String::from_utf8_lossy(take(&mut pos, n)?).into_owned(),
                ));
            }
            0x8c => {
                let n = take(&mut pos, 1)?[0] as usize;
                stack.push(Value::Str(
                    String::from_utf8_lossy(take(&mut pos, n)?).into_owned(),
                ));
            }
            b'U' => {
                let n = take(&mut pos, 1)?[0] as usize;
                stack.push(Value::Bytes(take(&mut pos, n)?.to_vec()));
            }
            b'T' | b'B' => {
                let b = take(&mut pos, 4)?;
                let n = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
                stack.push(Value::Bytes(take(&mut pos, n)?.to_vec()));
            }
            b'q' => {
                let i = take(&mut pos, 1)?[0] as u32;
                memo.insert(
                    i,
                    stack
                        .last()
                        .cloned()
                        .ok_or_else(|| anyhow::anyhow!("pickle: BINPUT on empty stack"))?,
                );
            }
            b'r' => {
                let b = take(&mut pos, 4)?;
                let i = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                memo.insert(
                    i,
                    stack
                        .last()
                        .cloned()
                        .ok_or_else(|| anyhow::anyhow!("pickle: PUT on empty stack"))?,
                );
            }
            0x94 => {
                let i = memo.len() as u32;
                memo.insert(
                    i,
                    stack
                        .last()
                        .cloned()
                        .ok_or_else(|| anyhow::anyhow!("pickle: MEMOIZE on empty stack"))?,
                );
            }
            b'h' => {
                let i = take(&mut pos, 1)?[0] as u32;
                stack.push(
                    memo.get(&i)
                        .cloned()
                        .ok_or_else(|| anyhow::anyhow!("pickle: unknown memo {i}"))?,
                );
            }
            b'j' => {
                let b = take(&mut pos, 4)?;
                let i = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                stack.push(
                    memo.get(&i)
                        .cloned()
                        .ok_or_else(|| anyhow::anyhow!("pickle: unknown memo {i}"))?,
                );
            }
            b'c' => {
                let line = |pos: &mut usize| -> Result<String> {
                    let start = *pos;
                    while *pos < bytes.len() && bytes[*pos] != b'\n' {
                        *pos += 1;
                    }
                    let s = String::from_utf8_lossy(&bytes[start..*pos]).into_owned();
                    *pos += 1;
                    Ok(s)
                };
                let module = line(&mut pos)?;
                let name = line(&mut pos)?;
                stack.push(global(&format!("{module}.{name}"))?);
            }
            0x93 => {
                let name = pop(&mut stack)?;
                let module = pop(&mut stack)?;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => stack.push(global(&format!("{m}.{n}"))?),
                    _ => bail!("pickle: STACK_GLOBAL without names"),
                }
            }
            b't' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                stack.push(Value::Tuple(items));
            }
            0x85 => {
                let a = pop(&mut stack)?;
                stack.push(Value::Tuple(vec![a]));
            }
            0x86 => {
                let b = pop(&mut stack)?;
                let a = pop(&mut stack)?;
                stack.push(Value::Tuple(vec![a, b]));
            }
            0x87 => {
                let c = pop(&mut stack)?;
                let b = pop(&mut stack)?;
                let a = pop(&mut stack)?;
                stack.push(Value::Tuple(vec![a, b, c]));
            }
            b'l' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                stack.push(Value::List(items));
            }
            b'd' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                stack.push(Value::Dict(pairs(items)?));
            }
            b'a' => {
                let v = pop(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::List(l)) => l.push(v),
                    _ => bail!("pickle: APPEND to a non-list"),
                }
            }
            b'e' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                match stack.last_mut() {
                    Some(Value::List(l)) => l.extend(items),
                    _ => bail!("pickle: APPENDS to a non-list"),
                }
            }
            b's' => {
                let v = pop(&mut stack)?;
                let k = pop(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::Dict(d)) => d.push((k, v)),
                    _ => bail!("pickle: SETITEM on a non-dict"),
                }
            }
            b'u' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                match stack.last_mut() {
                    Some(Value::Dict(d)) => d.extend(pairs(items)?),
                    _ => bail!("pickle: SETITEMS on a non-dict"),
                }
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                stack.push(persistent(pid)?);
            }
            b'R' => {
                let args = pop(&mut stack)?;
                let func = pop(&mut stack)?;
                stack.push(reduce(func, args)?);
            }
            b'b' => {
                // BUILD: object state (e.g. a state dict's `_metadata`); it carries no tensors.
                let _state = pop(&mut stack)?;
                if !matches!(stack.last(), Some(Value::Dict(_))) {
                    bail!("pickle: BUILD on something other than a dict");
                }
            }
            other => bail!(
                "pickle opcode 0x{other:02x} at byte {} is not accepted (only plain data and tensors are)",
                pos - 1
            ),
        }
    }
}

fn pairs(items: Vec<Value>) -> Result<Vec<(Value, Value)>> {
    if !items.len().is_multiple_of(2) {
        bail!("pickle: odd number of dict items");
    }
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

fn global(name: &str) -> Result<Value> {
    if ALLOWED_GLOBALS.contains(&name) || StorageKind::from_global(name).is_some() {
        Ok(Value::Global(name.to_string()))
    } else {
        bail!(
            "the pickle refers to '{name}'; atop does not run code from checkpoints and accepts only tensors in (ordered) dicts"
        )
    }
}

/// `('storage', torch.XStorage, key, location, numel)`.
fn persistent(pid: Value) -> Result<Value> {
    if let Value::Tuple(t) = &pid
        && let [
            Value::Str(tag),
            Value::Global(g),
            Value::Str(key),
            _location,
            Value::Int(numel),
        ] = t.as_slice()
        && tag == "storage"
        && let Some(kind) = StorageKind::from_global(g)
        && *numel >= 0
    {
        return Ok(Value::Storage {
            key: key.clone(),
            kind,
            numel: *numel as usize,
        });
    }
    bail!("pickle: unexpected persistent id {pid:?} (expected a PyTorch storage)")
}

fn ints(v: &Value, what: &str) -> Result<Vec<i64>> {
    match v {
        Value::Tuple(items) | Value::List(items) => items
            .iter()
            .map(|i| match i {
                Value::Int(n) => Ok(*n),
                other => bail!("pickle: {what} holds {other:?}, expected integers"),
            })
            .collect(),
        other => bail!("pickle: {what} is {other:?}, expected a tuple of integers"),
    }
}

fn reduce(func: Value, args: Value) -> Result<Value> {
    let Value::Global(name) = &func else {
        bail!("pickle: REDUCE of {func:?}, which is not a recognised function");
    };
    let Value::Tuple(args) = args else {
        bail!("pickle: REDUCE arguments of {name} are not a tuple");
    };
    match name.as_str() {
        "collections.OrderedDict" if args.is_empty() => Ok(Value::Dict(Vec::new())),
        "torch._utils._rebuild_tensor_v2" if args.len() >= 4 => {
            let Value::Storage { key, kind, numel } = &args[0] else {
                bail!("pickle: _rebuild_tensor_v2 without a storage");
            };
            let Value::Int(offset) = args[1] else {
                bail!("pickle: _rebuild_tensor_v2 offset is not an integer");
            };
            Ok(Value::Tensor(TensorRef {
                key: key.clone(),
                kind: *kind,
                storage_numel: *numel,
                offset,
                size: ints(&args[2], "tensor size")?,
                stride: ints(&args[3], "tensor stride")?,
            }))
        }
        "torch._utils._rebuild_parameter" if !args.is_empty() => match &args[0] {
            Value::Tensor(t) => Ok(Value::Tensor(t.clone())),
            other => bail!("pickle: _rebuild_parameter of {other:?}"),
        },
        _ => bail!(
            "pickle: {name} called with {} arguments is not accepted",
            args.len()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_arbitrary_globals_and_unknown_opcodes() {
        // cos.system('touch x') as a protocol-0 pickle: GLOBAL 'os system', then REDUCE.
        let evil = b"cos\nsystem\n(S'touch /tmp/atop-pwned'\ntR.";
        let err = load(evil).unwrap_err().to_string();
        assert!(
            err.contains("'os.system'") && err.contains("does not run code"),
            "{err}"
        );
        let err = load(b"\x80\x02cbuiltins\neval\n.").unwrap_err().to_string();
        assert!(err.contains("builtins.eval"), "{err}");
        assert!(
            load(b"\x80\x02I1\n.")
                .unwrap_err()
                .to_string()
                .contains("0x49")
        );
        assert!(
            load(b"\x80\x02}")
                .unwrap_err()
                .to_string()
                .contains("ends in the middle")
        );
    }

    #[test]
    fn reads_plain_data() {
        // {'a': [1, -2, 3.5, True, None], 'b': (300, 70000)} (protocol 2, built by hand)
        let mut p = vec![0x80, 2, b'}', b'('];
        p.extend(b"X\x01\x00\x00\x00a]("); // key 'a', empty list, mark
        p.extend([b'K', 1, 0x8a, 1, 0xfe, b'G']); // 1, -2, float
        p.extend(3.5f64.to_be_bytes());
        p.extend([0x88, b'N', b'e']); // True, None, APPENDS
        p.extend(b"X\x01\x00\x00\x00b"); // key 'b'
        p.extend([
            b'M', 0x2c, 0x01, b'J', 0x70, 0x11, 0x01, 0x00, 0x86, b'u', b'.',
        ]);
        let v = load(&p).unwrap();
        let Value::Dict(d) = v else { panic!("{v:?}") };
        assert_eq!(
            d[0].1,
            Value::List(vec![
                Value::Int(1),
                Value::Int(-2),
                Value::Float(3.5),
                Value::Bool(true),
                Value::None
            ])
        );
        assert_eq!(
            d[1].1,
            Value::Tuple(vec![Value::Int(300), Value::Int(70000)])
        );
    }
}
