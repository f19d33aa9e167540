//! How a kiln parameter's pieces are stored in a Hugging Face checkpoint, as data: the
//! compiler's `hf_weights` computes them from a model, the runtime's `hf` reads and writes
//! tensors by them.

/// How a piece is stored in its HF tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Layout {
    /// Exactly the kiln piece's shape and order.
    Same,
    /// GPT-2's `Conv1D`: a weight stored `[in, out]` (the transpose of kiln's `[out, in]`),
    /// or a bias `[out]`; the kiln piece is output chunk `index` of `count` equal chunks
    /// (`c_attn` holds query, key and value as chunks 0, 1, 2; other `Conv1D`s have one).
    Conv1d { index: usize, count: usize },
}

/// One HF tensor (or part of one) that makes up a kiln parameter.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Piece {
    /// The tensor's name in the HF checkpoint.
    pub name: String,
    pub layout: Layout,
}

impl Piece {
    /// A piece stored exactly as kiln stores it.
    pub fn same(name: impl Into<String>) -> Piece {
        Piece {
            name: name.into(),
            layout: Layout::Same,
        }
    }
}
