//! The plain matrix product on the `gemm` crate: the one GEMM under the linear layers
//! (`dense`), the router, and the precision emulation (`numerics::gemm`, `numerics::accum`).
//! It depends on neither, so the arrows run one way: `dense` → `numerics` → `matmul`.

use super::Real;

/// `c[m, n] = (accumulate ? c : 0) + op(a)[m, k] · op(b)[k, n]`, all row-major. `op(a)` is
/// `a` stored `[m, k]`, or `aᵀ` of `a` stored `[k, m]` when `trans_a`; likewise `op(b)` is
/// `b` stored `[k, n]`, or `bᵀ` of `b` stored `[n, k]` when `trans_b`.
///
/// Runs on the `gemm` crate with rayon's current thread count, f32 or f64 alike; the result
/// is deterministic for a given thread count.
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: Real>(
    m: usize,
    k: usize,
    n: usize,
    a: &[T],
    trans_a: bool,
    b: &[T],
    trans_b: bool,
    c: &mut [T],
    accumulate: bool,
) {
    let threads = rayon::current_num_threads();
    let threads = if m * n * k >= 64 * 64 * 64 {
        threads
    } else {
        1
    };
    matmul_on(threads, m, k, n, a, trans_a, b, trans_b, c, accumulate);
}

/// [`matmul`] on the calling thread alone: for products that already run as one of many
/// parallel tasks (one expert's GEMMs, say), where splitting each again only adds
/// synchronization.
#[allow(clippy::too_many_arguments)]
pub fn matmul_serial<T: Real>(
    m: usize,
    k: usize,
    n: usize,
    a: &[T],
    trans_a: bool,
    b: &[T],
    trans_b: bool,
    c: &mut [T],
    accumulate: bool,
) {
    matmul_on(1, m, k, n, a, trans_a, b, trans_b, c, accumulate);
}

#[allow(clippy::too_many_arguments)]
fn matmul_on<T: Real>(
    threads: usize,
    m: usize,
    k: usize,
    n: usize,
    a: &[T],
    trans_a: bool,
    b: &[T],
    trans_b: bool,
    c: &mut [T],
    accumulate: bool,
) {
    assert_eq!(
        a.len(),
        m * k,
        "matmul: a has {} elements, not {m}×{k}",
        a.len()
    );
    assert_eq!(
        b.len(),
        k * n,
        "matmul: b has {} elements, not {k}×{n}",
        b.len()
    );
    assert_eq!(
        c.len(),
        m * n,
        "matmul: c has {} elements, not {m}×{n}",
        c.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(T::ZERO);
        }
        return;
    }
    // Strides in elements: (row stride, column stride) of each operand as the product sees it.
    let (a_rs, a_cs) = if trans_a {
        (1, m as isize)
    } else {
        (k as isize, 1)
    };
    let (b_rs, b_cs) = if trans_b {
        (1, k as isize)
    } else {
        (n as isize, 1)
    };
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the three slices hold exactly the elements the strides address (checked above),
    // `c` does not alias `a` or `b` (it is borrowed mutably), and `T` is f32 or f64, which
    // `gemm` supports.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod matmul_tests {
    use super::*;

    fn naive(m: usize, k: usize, n: usize, a: &[f64], ta: bool, b: &[f64], tb: bool) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                for l in 0..k {
                    let x = if ta { a[l * m + i] } else { a[i * k + l] };
                    let y = if tb { b[j * k + l] } else { b[l * n + j] };
                    c[i * n + j] += x * y;
                }
            }
        }
        c
    }

    #[test]
    fn matches_the_naive_product_for_every_layout() {
        let (m, k, n) = (37, 53, 29);
        let a: Vec<f64> = (0..m * k)
            .map(|i| ((i * 7 % 13) as f64 - 6.0) / 7.0)
            .collect();
        let b: Vec<f64> = (0..k * n)
            .map(|i| ((i * 5 % 11) as f64 - 5.0) / 3.0)
            .collect();
        for ta in [false, true] {
            for tb in [false, true] {
                let want = naive(m, k, n, &a, ta, &b, tb);
                let mut c = vec![1.0; m * n];
                matmul(m, k, n, &a, ta, &b, tb, &mut c, false);
                for (x, y) in c.iter().zip(&want) {
                    assert!((x - y).abs() < 1e-12, "{ta} {tb}: {x} vs {y}");
                }
                let mut acc = vec![1.0; m * n];
                matmul(m, k, n, &a, ta, &b, tb, &mut acc, true);
                for (x, y) in acc.iter().zip(&want) {
                    assert!((x - (y + 1.0)).abs() < 1e-12);
                }
            }
        }
    }
}
