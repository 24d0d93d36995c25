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
    Tensor(Box<TensorRef>),
}

impl Value {
    /// A short description for errors (never the whole value: it may be huge).
    pub fn describe(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(b) => format!("the boolean {b}"),
            Value::Int(i) => format!("the integer {i}"),
            Value::Float(f) => format!("the number {f}"),
            Value::Str(s) if s.chars().count() > 60 => {
                format!("the string '{}...'", s.chars().take(60).collect::<String>())
            }
            Value::Str(s) => format!("the string '{s}'"),
            Value::Bytes(b) => format!("{} bytes", b.len()),
            Value::Tuple(v) => format!("a tuple of {} items", v.len()),
            Value::List(v) => format!("a list of {} items", v.len()),
            Value::Dict(d) => format!("a dict of {} entries", d.len()),
            Value::Global(g) => format!("the global {g}"),
            Value::Storage { kind, numel, .. } => format!("a {kind:?} storage of {numel} elements"),
            Value::Tensor(t) if t.size.len() > 8 => {
                format!("a tensor of {} dimensions", t.size.len())
            }
            Value::Tensor(t) => format!("a tensor of shape {:?}", t.size),
        }
    }

    /// Estimated bytes the value takes (walked without recursion).
    fn cost(&self) -> usize {
        let mut total = 0usize;
        let mut todo = vec![self];
        while let Some(v) = todo.pop() {
            let extra = match v {
                Value::Str(s) => s.len(),
                Value::Bytes(b) => b.len(),
                Value::Tuple(items) | Value::List(items) => {
                    todo.extend(items);
                    0
                }
                Value::Dict(d) => {
                    for (k, v) in d {
                        todo.push(k);
                        todo.push(v);
                    }
                    0
                }
                Value::Storage { key, .. } => key.len(),
                Value::Tensor(t) => {
                    std::mem::size_of::<TensorRef>()
                        + t.key.len()
                        + 8 * (t.size.len() + t.stride.len())
                }
                _ => 0,
            };
            total = total.saturating_add(NODE + extra);
        }
        total
    }
}

const ALLOWED_GLOBALS: &[&str] = &[
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
];

/// Deepest nesting of containers (and of MARKs) accepted. A state dict needs a handful of
/// levels; the bound keeps every walk of a value (drop, clone, comparison, printing) far from
/// the end of the stack, whatever the file says.
pub const MAX_DEPTH: usize = 1000;

/// Memory the values of one pickle may take (an estimate counted as they are made, memo copies
/// included): a state dict of 100,000 tensors takes well under it, while a small pickle that
/// copies a memoized value over and over (a "billion laughs") is stopped long before it
/// exhausts memory.
pub const MAX_VALUE_BYTES: usize = 256 << 20;

/// A value on the unpickler's stack, with its nesting depth (0 for scalars).
struct Item {
    v: Value,
    depth: usize,
}

/// The unpickler's stack, marks and memo, with the depth and memory bounds.
struct Machine {
    stack: Vec<Item>,
    marks: Vec<usize>,
    memo: HashMap<u32, Item>,
    /// Estimated bytes of the values made so far.
    spent: usize,
    /// Byte offset of the opcode being run (for errors).
    at: usize,
}

const NODE: usize = std::mem::size_of::<Item>();

impl Machine {
    fn charge(&mut self, bytes: usize) -> Result<()> {
        self.spent = self.spent.saturating_add(bytes);
        if self.spent > MAX_VALUE_BYTES {
            bail!(
                "the values built by byte {} take more than {} MiB: not a PyTorch state dict",
                self.at,
                MAX_VALUE_BYTES >> 20
            );
        }
        Ok(())
    }

    fn check_depth(&self, depth: usize) -> Result<()> {
        if depth > MAX_DEPTH {
            bail!(
                "nesting deeper than {MAX_DEPTH} levels at byte {}: not a PyTorch state dict",
                self.at
            );
        }
        Ok(())
    }

    /// Pushes a new scalar (or empty container: `depth` 1).
    fn push(&mut self, v: Value, depth: usize) -> Result<()> {
        let extra = match &v {
            Value::Str(s) => s.len(),
            Value::Bytes(b) => b.len(),
            _ => 0,
        };
        self.charge(NODE + extra)?;
        self.stack.push(Item { v, depth });
        Ok(())
    }

    /// Pushes a container made of `items` (already paid for).
    fn push_container(
        &mut self,
        items: Vec<Item>,
        make: fn(Vec<Value>) -> Result<Value>,
    ) -> Result<()> {
        let depth = 1 + items.iter().map(|i| i.depth).max().unwrap_or(0);
        self.check_depth(depth)?;
        self.charge(NODE)?;
        let v = make(items.into_iter().map(|i| i.v).collect())?;
        self.stack.push(Item { v, depth });
        Ok(())
    }

    fn pop(&mut self) -> Result<Item> {
        self.stack
            .pop()
            .ok_or_else(|| anyhow::anyhow!("pickle stack underflow at byte {}", self.at))
    }

    fn mark(&mut self) -> Result<()> {
        if self.marks.len() >= MAX_DEPTH {
            self.check_depth(self.marks.len() + 1)?;
        }
        self.marks.push(self.stack.len());
        Ok(())
    }

    fn pop_mark(&mut self) -> Result<Vec<Item>> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| anyhow::anyhow!("pickle: MARK expected at byte {}", self.at))?;
        if m > self.stack.len() {
            bail!("pickle: corrupt MARK at byte {}", self.at);
        }
        Ok(self.stack.split_off(m))
    }

    /// Adds `children` to the container on top of the stack (APPEND(S), SETITEM(S)).
    fn extend_top(&mut self, children: Vec<Item>, what: &str) -> Result<()> {
        let child_depth = children.iter().map(|i| i.depth).max().unwrap_or(0);
        let at = self.at;
        let Some(top_depth) = self.stack.last().map(|t| t.depth) else {
            bail!("pickle: {what} on an empty stack at byte {at}");
        };
        let depth = top_depth.max(child_depth + 1);
        self.check_depth(depth)?;
        let top = self.stack.last_mut().expect("checked above");
        match (&mut top.v, what) {
            (Value::List(l), "APPEND" | "APPENDS") => l.extend(children.into_iter().map(|i| i.v)),
            (Value::Dict(d), "SETITEM" | "SETITEMS") => {
                d.extend(pairs(children.into_iter().map(|i| i.v).collect())?)
            }
            (other, _) => bail!("pickle: {what} on {} at byte {at}", other.describe()),
        }
        top.depth = depth;
        Ok(())
    }

    /// A copy of the top of the stack into the memo.
    fn put(&mut self, i: u32) -> Result<()> {
        let Some(cost) = self.stack.last().map(|t| t.v.cost()) else {
            bail!("pickle: memo store on an empty stack at byte {}", self.at);
        };
        // Charged before the copy is made.
        self.charge(cost)?;
        let top = self.stack.last().expect("checked above");
        let item = Item {
            v: top.v.clone(),
            depth: top.depth,
        };
        self.memo.insert(i, item);
        Ok(())
    }

    /// A copy of a memo entry onto the stack.
    fn get(&mut self, i: u32) -> Result<()> {
        let Some(m) = self.memo.get(&i) else {
            bail!("pickle: unknown memo {i} at byte {}", self.at);
        };
        // Charged before the copy is made.
        let (cost, depth) = (m.v.cost(), m.depth);
        self.charge(cost)?;
        let v = self.memo[&i].v.clone();
        self.stack.push(Item { v, depth });
        Ok(())
    }
}

/// The unread rest of a pickle.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.bytes.len() - self.pos {
            bail!(
                "pickle ends in the middle of an instruction at byte {}",
                self.pos
            );
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// A newline-terminated argument (GLOBAL's module and name).
    fn line(&mut self) -> Result<String> {
        let start = self.pos;
        let Some(len) = self.bytes[start..].iter().position(|&b| b == b'\n') else {
            bail!("pickle ends in the middle of a GLOBAL at byte {start}");
        };
        self.pos = start + len + 1;
        Ok(String::from_utf8_lossy(&self.bytes[start..start + len]).into_owned())
    }
}

fn u32_le(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Interprets `bytes` (a `data.pkl`) as data.
pub fn load(bytes: &[u8]) -> Result<Value> {
    let mut m = Machine {
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        spent: 0,
        at: 0,
    };
    let mut r = Reader { bytes, pos: 0 };
    loop {
        m.at = r.pos;
        let op = r.take(1)?[0];
        if op == b'.' {
            return Ok(m.pop()?.v);
        }
        if !m.constant(op, &mut r)? && !m.structure(op, &mut r)? {
            bail!(
                "pickle opcode 0x{op:02x} at byte {} is not accepted (only plain data and tensors are)",
                m.at
            );
        }
    }
}

impl Machine {
    /// Opcodes that push one value read from the pickle (protocol and frame markers push
    /// nothing); false for any other opcode.
    fn constant(&mut self, op: u8, r: &mut Reader<'_>) -> Result<bool> {
        match op {
            0x80 => {
                let proto = r.take(1)?[0];
                if proto > 5 {
                    bail!("pickle protocol {proto} is not supported");
                }
            }
            0x95 => {
                r.take(8)?; // FRAME: length only
            }
            b'N' => self.push(Value::None, 0)?,
            0x88 => self.push(Value::Bool(true), 0)?,
            0x89 => self.push(Value::Bool(false), 0)?,
            b'K' => self.push(Value::Int(r.take(1)?[0] as i64), 0)?,
            b'M' => {
                let b = r.take(2)?;
                self.push(Value::Int(u16::from_le_bytes([b[0], b[1]]) as i64), 0)?;
            }
            b'J' => {
                let b = r.take(4)?;
                self.push(Value::Int(u32_le(b) as i32 as i64), 0)?;
            }
            0x8a => {
                let n = r.take(1)?[0] as usize;
                let b = r.take(n)?;
                if n > 8 {
                    bail!(
                        "pickle: integer of {n} bytes at byte {} is too large",
                        self.at
                    );
                }
                let mut v: i64 = 0;
                for (i, &byte) in b.iter().enumerate() {
                    v |= (byte as i64) << (8 * i);
                }
                if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n); // sign-extend
                }
                self.push(Value::Int(v), 0)?;
            }
            b'G' => {
                let b = r.take(8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                self.push(Value::Float(f64::from_be_bytes(a)), 0)?;
            }
            b'X' => {
                let n = u32_le(r.take(4)?) as usize;
                let s = String::from_utf8_lossy(r.take(n)?).into_owned();
                self.push(Value::Str(s), 0)?;
            }
            0x8c => {
                let n = r.take(1)?[0] as usize;
                let s = String::from_utf8_lossy(r.take(n)?).into_owned();
                self.push(Value::Str(s), 0)?;
            }
            b'U' => {
                let n = r.take(1)?[0] as usize;
                self.push(Value::Bytes(r.take(n)?.to_vec()), 0)?;
            }
            b'T' | b'B' => {
                let n = u32_le(r.take(4)?) as usize;
                self.push(Value::Bytes(r.take(n)?.to_vec()), 0)?;
            }
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                self.push(global(&format!("{module}.{name}"))?, 0)?;
            }
            0x93 => {
                let name = self.pop()?.v;
                let module = self.pop()?.v;
                match (module, name) {
                    (Value::Str(a), Value::Str(b)) => self.push(global(&format!("{a}.{b}"))?, 0)?,
                    _ => bail!("pickle: STACK_GLOBAL without names at byte {}", self.at),
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Opcodes that build containers, use the memo or call the few accepted constructors;
    /// false for any other opcode.
    fn structure(&mut self, op: u8, r: &mut Reader<'_>) -> Result<bool> {
        match op {
            b'(' => self.mark()?,
            b'}' => self.push(Value::Dict(Vec::new()), 1)?,
            b']' => self.push(Value::List(Vec::new()), 1)?,
            b')' => self.push(Value::Tuple(Vec::new()), 1)?,
            b'q' => {
                let i = r.take(1)?[0] as u32;
                self.put(i)?;
            }
            b'r' => {
                let i = u32_le(r.take(4)?);
                self.put(i)?;
            }
            0x94 => {
                let i = self.memo.len() as u32;
                self.put(i)?;
            }
            b'h' => {
                let i = r.take(1)?[0] as u32;
                self.get(i)?;
            }
            b'j' => {
                let i = u32_le(r.take(4)?);
                self.get(i)?;
            }
            b't' => {
                let items = self.pop_mark()?;
                self.push_container(items, |v| Ok(Value::Tuple(v)))?;
            }
            0x85..=0x87 => {
                let k = (op - 0x84) as usize;
                let mut items = Vec::with_capacity(k);
                for _ in 0..k {
                    items.push(self.pop()?);
                }
                items.reverse();
                self.push_container(items, |v| Ok(Value::Tuple(v)))?;
            }
            b'l' => {
                let items = self.pop_mark()?;
                self.push_container(items, |v| Ok(Value::List(v)))?;
            }
            b'd' => {
                let items = self.pop_mark()?;
                self.push_container(items, |v| Ok(Value::Dict(pairs(v)?)))?;
            }
            b'a' => {
                let v = self.pop()?;
                self.extend_top(vec![v], "APPEND")?;
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.extend_top(items, "APPENDS")?;
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.extend_top(vec![k, v], "SETITEM")?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.extend_top(items, "SETITEMS")?;
            }
            b'Q' => {
                let pid = self.pop()?.v;
                self.push(persistent(pid)?, 1)?;
            }
            b'R' => {
                let args = self.pop()?.v;
                let func = self.pop()?.v;
                self.push(reduce(func, args)?, 1)?;
            }
            b'b' => {
                // BUILD: object state (e.g. a state dict's `_metadata`); it carries no tensors.
                let _state = self.pop()?;
                if !matches!(
                    self.stack.last(),
                    Some(Item {
                        v: Value::Dict(_),
                        ..
                    })
                ) {
                    bail!(
                        "pickle: BUILD on something other than a dict at byte {}",
                        self.at
                    );
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
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
    bail!(
        "pickle: unexpected persistent id {} (expected a PyTorch storage)",
        pid.describe()
    )
}

fn ints(v: &Value, what: &str) -> Result<Vec<i64>> {
    match v {
        Value::Tuple(items) | Value::List(items) => items
            .iter()
            .map(|i| match i {
                Value::Int(n) => Ok(*n),
                other => bail!(
                    "pickle: {what} holds {}, expected integers",
                    other.describe()
                ),
            })
            .collect(),
        other => bail!(
            "pickle: {what} is {}, expected a tuple of integers",
            other.describe()
        ),
    }
}

fn reduce(func: Value, args: Value) -> Result<Value> {
    let Value::Global(name) = &func else {
        bail!(
            "pickle: REDUCE of {}, which is not a recognised function",
            func.describe()
        );
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
            Ok(Value::Tensor(Box::new(TensorRef {
                key: key.clone(),
                kind: *kind,
                storage_numel: *numel,
                offset,
                size: ints(&args[2], "tensor size")?,
                stride: ints(&args[3], "tensor stride")?,
            })))
        }
        "torch._utils._rebuild_parameter" if !args.is_empty() => match &args[0] {
            Value::Tensor(t) => Ok(Value::Tensor(t.clone())),
            other => bail!("pickle: _rebuild_parameter of {}", other.describe()),
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

    fn nesting_error(p: &[u8]) -> String {
        let err = load(p).unwrap_err().to_string();
        assert!(
            err.contains("nesting deeper than 1000 levels at byte")
                && err.contains("not a PyTorch state dict"),
            "{err}"
        );
        err
    }

    #[test]
    fn deep_nesting_is_refused_without_overflowing_the_stack() {
        let key = b"X\x01\x00\x00\x00k";
        let mut proto = vec![0x80, 2];
        // MARK x 100k then LIST x 100k; TUPLE1 x 1M around an int; dicts nested by SETITEM
        // (no MARKs); lists nested by APPEND.
        let mut marks = proto.clone();
        marks.extend(std::iter::repeat_n(b'(', 100_000));
        marks.extend(std::iter::repeat_n(b'l', 100_000));
        marks.push(b'.');
        let err = nesting_error(&marks);
        assert!(err.contains("at byte 1002"), "{err}");
        let mut tuples = proto.clone();
        tuples.extend([b'K', 1]);
        tuples.extend(std::iter::repeat_n(0x85, 1_000_000));
        tuples.push(b'.');
        nesting_error(&tuples);
        let mut dicts = proto.clone();
        for _ in 0..1_000_000 {
            dicts.push(b'}');
            dicts.extend(key);
        }
        dicts.push(b'}');
        dicts.extend(std::iter::repeat_n(b's', 1_000_000));
        dicts.push(b'.');
        nesting_error(&dicts);
        let mut lists = proto.clone();
        lists.extend(std::iter::repeat_n(b']', 100_000));
        lists.extend(std::iter::repeat_n(b'a', 99_999));
        lists.push(b'.');
        nesting_error(&lists);
        // 1000 levels are accepted (and dropped without trouble).
        proto.extend(std::iter::repeat_n(b'(', 1000));
        proto.extend(std::iter::repeat_n(b'l', 1000));
        proto.push(b'.');
        let mut v = load(&proto).unwrap();
        let mut depth = 0;
        while let Value::List(mut items) = v {
            depth += 1;
            v = items.pop().unwrap_or(Value::None);
        }
        assert_eq!(depth, 1000);
    }

    #[test]
    fn memo_copies_cannot_exhaust_memory() {
        // "billion laughs": a list, then 64 times a pair of two copies of the previous value.
        let mut p = vec![0x80, 2, b']', b'q', 0];
        for _ in 0..64 {
            p.extend([b'h', 0, b'h', 0, 0x86, b'q', 0]);
        }
        p.push(b'.');
        let err = load(&p).unwrap_err().to_string();
        assert!(err.contains("take more than 256 MiB"), "{err}");
        // A long string copied a million times.
        let mut p = vec![0x80, 2, b'X'];
        p.extend((1u32 << 20).to_le_bytes());
        p.extend(vec![b'a'; 1 << 20]);
        p.extend([b'q', 0]);
        for _ in 0..1_000_000 {
            p.extend([b'h', 0]);
        }
        let err = load(&p).unwrap_err().to_string();
        assert!(err.contains("MiB"), "{err}");
    }

    #[test]
    fn truncated_instructions_are_errors_not_panics() {
        for p in [
            &b"\x80\x02cfoo"[..],
            b"\x80\x02cfoo\nbar",
            b"\x80\x02X\xff\xff\xff\xffab",
            b"\x80\x02(",
            b"\x80\x02t",
            b"\x80\x02K\x01a.",
            b"\x80\x02]K\x01K\x02s.",
            b"\x80\x02h\x05",
        ] {
            assert!(load(p).is_err(), "{p:?}");
        }
    }
}
