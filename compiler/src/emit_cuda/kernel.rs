//! How a kernel is written, the one way: a [`KernelDef`] holds what the kernel computes (its
//! comment), its parameters — each with its C type *and* the argument a launch passes for it —
//! and its body. [`Emitter::launch`] writes the kernel into the translation unit once (a
//! kernel that two nodes define identically is found again by its text) and returns the
//! launch, whose arguments come from the same list as the C declaration: the two cannot fall
//! out of line, and the manifest records each kernel's parameters for the runtime to check
//! its arguments against.
//!
//! Every kernel runs [`BLOCK`] threads per block and says so, with [`MIN_BLOCKS`] blocks per
//! multiprocessor (`__launch_bounds__(256, 4)`: 64 registers a thread) unless it is heavy
//! (`(256)`: ptxas's own budget); loops over
//! more elements than the launch has threads go round with [`grid_stride`].

use std::fmt::Write;

use super::{Arg, Elem, Emitter, Kernel, Launch, Param, Pass, Work, BLOCK, MAX_GRID};

/// A kernel: its name's base and summary, comment, parameters bound to a launch's arguments
/// and body (its shared memory is static, in the body). Built by chaining, then launched with [`Emitter::launch`].
#[derive(Clone, Debug)]
pub(super) struct KernelDef {
    base: String,
    summary: String,
    doc: String,
    params: Vec<Param>,
    args: Vec<Arg>,
    body: String,
    /// Leaves ptxas its own register budget (`__launch_bounds__(256)`), for kernels that keep
    /// much per thread (attention's accumulators, a router's scores).
    heavy: bool,
}

/// How many blocks a launch runs.
#[derive(Clone, Copy, Debug)]
pub(super) enum Grid {
    /// One thread per element (or group of elements) of `n`: as many blocks as cover them, at
    /// most [`MAX_GRID`]; the kernel's [`grid_stride`] loop goes round for the rest.
    Threads(u64),
    /// Exactly this many blocks (one per row, per tile, per chunk…), at least one.
    Blocks(u64),
}

impl Grid {
    fn blocks(self) -> u64 {
        match self {
            Grid::Threads(n) => n.div_ceil(u64::from(BLOCK)).clamp(1, MAX_GRID),
            Grid::Blocks(n) => n.max(1),
        }
    }
}

impl KernelDef {
    /// A kernel named after `base` (sanitized and made unique when written), which the
    /// manifest describes by `summary`.
    pub fn new(base: impl Into<String>, summary: impl Into<String>) -> KernelDef {
        KernelDef {
            base: base.into(),
            summary: summary.into(),
            doc: String::new(),
            params: Vec::new(),
            args: Vec::new(),
            body: String::new(),
            heavy: false,
        }
    }

    /// Comment lines that say what the kernel computes and the shapes of its arguments, each
    /// line starting with `//` (several lines at once are fine; a trailing newline is not
    /// needed).
    pub fn doc(mut self, lines: impl AsRef<str>) -> KernelDef {
        for line in lines.as_ref().lines() {
            assert!(
                line.starts_with("//"),
                "a kernel's doc line is a comment: {line:?}"
            );
            self.doc.push_str(line);
            self.doc.push('\n');
        }
        self
    }

    /// A parameter and the argument launches pass for it. Pointers take buffers, `long long`
    /// takes [`Arg::Int`], `float` takes [`Arg::Float`] or [`Arg::Hyper`]: anything else is
    /// a bug of the emitter, caught here.
    pub fn param(mut self, name: &str, elem: Elem, pass: Pass, arg: Arg) -> KernelDef {
        let fits = match (pass, &arg) {
            (Pass::Value, Arg::Int { .. }) => elem == Elem::I64,
            (Pass::Value, Arg::Float { .. } | Arg::Hyper { .. }) => elem == Elem::F32,
            (Pass::Value, _) => false,
            (_, Arg::Int { .. } | Arg::Float { .. } | Arg::Hyper { .. }) => false,
            (Pass::Read | Pass::Write, _) => true,
        };
        assert!(
            fits,
            "kernel {}: parameter {name} ({}) cannot take {arg:?}",
            self.base,
            Param::new(name, elem, pass).c_decl()
        );
        self.params.push(Param::new(name, elem, pass));
        self.args.push(arg);
        self
    }

    /// `const float* __restrict__ name`.
    pub fn read(self, name: &str, arg: Arg) -> KernelDef {
        self.param(name, Elem::F32, Pass::Read, arg)
    }

    /// `float* __restrict__ name`.
    pub fn write(self, name: &str, arg: Arg) -> KernelDef {
        self.param(name, Elem::F32, Pass::Write, arg)
    }

    /// `long long name`, passed `value`.
    pub fn long(self, name: &str, value: u64) -> KernelDef {
        self.param(name, Elem::I64, Pass::Value, super::int(value))
    }

    /// `float name`, passed `value`.
    pub fn float(self, name: &str, value: f64) -> KernelDef {
        self.param(name, Elem::F32, Pass::Value, Arg::Float { value })
    }

    /// The statements of the kernel, each line indented by four spaces at least.
    pub fn body(mut self, text: impl Into<String>) -> KernelDef {
        self.body = text.into();
        if !self.body.is_empty() && !self.body.ends_with('\n') {
            self.body.push('\n');
        }
        self
    }

    /// A kernel that keeps much state per thread (attention's accumulator arrays, a router's
    /// scores): ptxas gets its own register budget instead of [`MIN_BLOCKS`]'s 64.
    pub fn heavy(mut self) -> KernelDef {
        self.heavy = true;
        self
    }

    /// The kernel renamed after `base` (for names that depend on what was bound).
    pub fn rename(mut self, base: impl Into<String>) -> KernelDef {
        self.base = base.into();
        self
    }

    /// The kernel's source with `name`.
    fn text(&self, name: &str) -> String {
        let params = self
            .params
            .iter()
            .map(Param::c_decl)
            .collect::<Vec<_>>()
            .join(", ");
        let bounds = if self.heavy {
            format!("{BLOCK}")
        } else {
            format!("{BLOCK}, {MIN_BLOCKS}")
        };
        format!(
            "{}extern \"C\" __global__ void __launch_bounds__({bounds}) {name}({params}) {{\n{}}}\n",
            self.doc, self.body
        )
    }
}

/// The blocks per multiprocessor a kernel asks ptxas to fit (`__launch_bounds__`'s second
/// argument) unless it is [`KernelDef::heavy`]: 4 × 256 threads leave each thread 64
/// registers. Without it ptxas aims at 8 blocks (32 registers) and spills a kernel as small
/// as the experts' combine gradient; with 1 it spends up to 143 registers on memory-bound
/// kernels.
const MIN_BLOCKS: u32 = 4;

/// The first index and the stride of a grid-stride loop over all threads of the launch.
pub(super) const GRID_START: &str = "blockIdx.x * (long long)blockDim.x + threadIdx.x";
pub(super) const GRID_STRIDE: &str = "(long long)gridDim.x * blockDim.x";

/// The header of a loop over `var` from the launch's thread index to `bound`, by the launch's
/// thread count, at `indent`; the caller writes the body and the closing brace.
pub(super) fn grid_stride(indent: &str, var: &str, bound: &str) -> String {
    format!(
        "{indent}for (long long {var} = {GRID_START}; {var} < {bound};\n\
         {indent}     {var} += {GRID_STRIDE}) {{\n"
    )
}

/// The placeholder for a kernel's name in its text until it is named.
const NAME: &str = "@KERNEL@";

impl Emitter<'_> {
    /// Writes `def` for `node` unless the same kernel was written before; returns its name.
    fn define(&mut self, node: usize, def: &KernelDef) -> String {
        let text = def.text(NAME);
        if let Some(&index) = self.by_text.get(&text) {
            let k = &mut self.kernels[index];
            if !k.nodes.contains(&node) {
                k.nodes.push(node);
            }
            return k.name.clone();
        }
        let name = self.namer.call(&def.base);
        let _ = writeln!(self.out, "{}", def.text(&name));
        self.kernels.push(Kernel {
            name: name.clone(),
            summary: def.summary.clone(),
            block: BLOCK,
            shared_bytes: 0,
            params: def.params.clone(),
            nodes: vec![node],
        });
        self.by_text.insert(text, self.kernels.len() - 1);
        name
    }

    /// The launch of `def` for `node` over `grid`, the kernel written if it is new.
    pub(super) fn launch(&mut self, node: usize, def: KernelDef, grid: Grid) -> Launch {
        let kernel = self.define(node, &def);
        Launch {
            kernel,
            grid: grid.blocks(),
            block: BLOCK,
            shared_bytes: 0,
            args: def.args,
        }
    }

    /// [`Emitter::launch`] as a step's work.
    pub(super) fn work(&mut self, node: usize, def: KernelDef, grid: Grid) -> Work {
        Work::Launch(self.launch(node, def, grid))
    }
}
