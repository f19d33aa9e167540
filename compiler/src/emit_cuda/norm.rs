//! Norms: RMSNorm and LayerNorm, forward (the residual add fused in, the output quantized to
//! FP8 on the way out where a GEMM reads it) and backward (the input gradient, with the
//! residual gradient joined, and the weight and bias gradients), one block per row.

use std::fmt::Write;

use super::fp8::{quantizing_loop, TileOut, Tiles};
use super::{float_lit, val, Arg, Elem, Emitter, Grid, KernelDef, Pass, Work};
use crate::ir::Node;
use crate::model::NormKind;

/// The last loop of a row kernel (one block per row of `d`): element `j` of the row is the
/// expression `value` (after the lines `pre`, which may declare temporaries), written to
/// `dst[j]`; with an FP8 copy to write, four consecutive elements per thread, quantized into
/// the row's tiles as they are written (the copy's pointers are offset by `row`).
fn row_epilogue(
    quantized: &Option<(Tiles, Arg, Arg)>,
    d: u64,
    dst: &str,
    pre: &[String],
    value: &str,
) -> String {
    let Some((tiles, ..)) = quantized else {
        if pre.is_empty() {
            return format!(
                "    for (int j = threadIdx.x; j < {d}; j += blockDim.x) {dst}[j] = {value};\n"
            );
        }
        let mut s = format!("    for (int j = threadIdx.x; j < {d}; j += blockDim.x) {{\n");
        for line in pre {
            let _ = writeln!(s, "        {line}");
        }
        let _ = writeln!(s, "        {dst}[j] = {value};\n    }}");
        return s;
    };
    let mut element = pre.to_vec();
    element.push(format!("const float value = {value};"));
    let mut s = format!(
        "    unsigned* const row_codes = codes + row * {};\n    float* const row_scales = scales + row * {};\n",
        d / 4,
        d / tiles.t
    );
    s.push_str(&quantizing_loop(
        "    ",
        "threadIdx.x",
        "blockDim.x",
        &(d / 4).to_string(),
        &element,
        &[TileOut {
            tiles: *tiles,
            value: "value",
            store: Some(dst),
            codes: "row_codes",
            scales: "row_scales",
        }],
    ));
    s
}

impl Emitter<'_> {
    /// A norm's forward (`add` adds the residual first and writes the sum too).
    pub(super) fn norm_fwd(
        &mut self,
        index: usize,
        node: &Node,
        kind: NormKind,
        eps: f64,
        add: bool,
    ) -> Vec<Work> {
        let x = node.inputs[0];
        let (rows, d) = self.rows(x);
        // y, and the FP8 copy of it the kernel writes too, if one is planned here.
        let y = *node.outputs.last().expect("a norm has an output");
        let quantized = self.fused_copy(index, y);
        let layer = kind == NormKind::LayerNorm;
        let kind_name = if layer { "layer_norm" } else { "rms_norm" };
        let op = if add {
            format!("add_{kind_name}")
        } else {
            kind_name.to_string()
        };
        let eps_lit = float_lit(eps);
        let mut t = String::new();
        let _ = writeln!(
            t,
            "// {}y = {} over rows of {d}, statistics in f32 (eps = {eps_lit}).",
            if add { "s = x + r; " } else { "" },
            if layer {
                "(s − mean) / sqrt(var + eps) · w + b"
            } else {
                "s / sqrt(mean(s²) + eps) · w"
            }
        );
        let _ = writeln!(
            t,
            "// x{}: f32[rows, {d}]; w{}: f32[{d}]; {}y: f32[rows, {d}]",
            if add { ", r" } else { "" },
            if layer { ", b" } else { "" },
            if add { "s, " } else { "" }
        );
        if let Some((tiles, ..)) = &quantized {
            let _ = writeln!(t, "{}", tiles.comment("y"));
        }
        // x, (r), w, (b) and (s), y, as the node has them.
        let mut names = vec!["x"];
        if add {
            names.push("r");
        }
        names.push("w");
        if layer {
            names.push("b");
        }
        let mut def = KernelDef::new("", format!("{op} forward over rows of {d}"));
        for (name, &v) in names.iter().zip(&node.inputs) {
            def = def.read(name, val(v));
        }
        let outs: &[&str] = if add { &["s", "y"] } else { &["y"] };
        for (name, &v) in outs.iter().zip(&node.outputs) {
            def = def.write(name, val(v));
        }
        let doc = std::mem::take(&mut t);
        let _ = writeln!(t, "    __shared__ float scratch[32];");
        let _ = writeln!(t, "    const long long row = blockIdx.x;");
        let _ = writeln!(t, "    if (row >= rows) return;");
        let _ = writeln!(t, "    const float* xr = x + row * {d};");
        if add {
            let _ = writeln!(t, "    const float* rr = r + row * {d};");
            let _ = writeln!(t, "    float* sr = s + row * {d};");
        }
        let _ = writeln!(t, "    float* yr = y + row * {d};");
        let load = if add { "xr[j] + rr[j]" } else { "xr[j]" };
        if add {
            let _ = writeln!(
                t,
                "    for (int j = threadIdx.x; j < {d}; j += blockDim.x) sr[j] = {load};"
            );
            let _ = writeln!(t, "    __syncthreads();");
        }
        let src = if add { "sr" } else { "xr" };
        if layer {
            let _ = writeln!(t, "    float sum = 0.0f;");
            let _ = writeln!(
                t,
                "    for (int j = threadIdx.x; j < {d}; j += blockDim.x) sum += {src}[j];"
            );
            let _ = writeln!(
                t,
                "    const float mean = kiln_block_sum(sum, scratch) / {d}.0f;"
            );
            let _ = writeln!(t, "    float sq = 0.0f;");
            let _ = writeln!(t, "    for (int j = threadIdx.x; j < {d}; j += blockDim.x) {{ const float c = {src}[j] - mean; sq += c * c; }}");
            let _ = writeln!(
                t,
                "    const float rstd = rsqrtf(kiln_block_sum(sq, scratch) / {d}.0f + {eps_lit});"
            );
        } else {
            let _ = writeln!(t, "    float sq = 0.0f;");
            let _ = writeln!(t, "    for (int j = threadIdx.x; j < {d}; j += blockDim.x) {{ const float v = {src}[j]; sq += v * v; }}");
            let _ = writeln!(
                t,
                "    const float rstd = rsqrtf(kiln_block_sum(sq, scratch) / {d}.0f + {eps_lit});"
            );
        }
        let element = if layer {
            format!("({src}[j] - mean) * rstd * w[j] + b[j]")
        } else {
            format!("{src}[j] * rstd * w[j]")
        };
        t.push_str(&row_epilogue(&quantized, d, "yr", &[], &element));
        let mut base = format!("{op}_fwd_d{d}");
        if let Some((tiles, codes, scales)) = quantized {
            base.push_str(&format!("_q{}", tiles.suffix()));
            def = def
                .param("codes", Elem::U32, Pass::Write, codes)
                .write("scales", scales);
        }
        let def = def.rename(base).doc(doc).long("rows", rows).body(t);
        vec![self.work(index, def, Grid::Blocks(rows))]
    }

    /// A norm's backward: one kernel for the input gradient (plus the residual stream's `ds`
    /// when `add`), saving each row's statistics, and one for the weight (and bias) gradients,
    /// summed over rows in a fixed order.
    pub(super) fn norm_bwd(
        &mut self,
        index: usize,
        node: &Node,
        kind: NormKind,
        eps: f64,
        add: bool,
    ) -> Vec<Work> {
        let x = node.inputs[0];
        let (rows, d) = self.rows(x);
        let quantized = self.fused_copy(index, node.outputs[0]);
        let layer = kind == NormKind::LayerNorm;
        let kind_name = if layer { "layer_norm" } else { "rms_norm" };
        let op = if add {
            format!("add_{kind_name}")
        } else {
            kind_name.to_string()
        };
        let eps_lit = float_lit(eps);
        let mut t = String::new();
        let _ = writeln!(
            t,
            "// The input gradient of {kind_name} over rows of {d}{}; saves each row's {} for the weight gradient.",
            if add { ", plus the residual stream's gradient ds" } else { "" },
            if layer { "mean and 1/std" } else { "1/rms" }
        );
        // Each row's statistics for the weight gradient: (mean, 1/std), or 1/rms alone.
        let per_row = if layer { 2 } else { 1 };
        let _ = writeln!(
            t,
            "// x, dy{}, dx: f32[rows, {d}]; w: f32[{d}]; stats: f32[rows{}]",
            if add { ", ds" } else { "" },
            if layer { ", 2" } else { "" }
        );
        if let Some((tiles, ..)) = &quantized {
            let _ = writeln!(t, "{}", tiles.comment("dx"));
        }
        let stats = Arg::Scratch {
            slot: 0,
            bytes: rows * 4 * per_row,
        };
        let mut dx = KernelDef::new("", format!("{op} input gradient over rows of {d}"))
            .read("x", val(node.inputs[0]))
            .read("w", val(node.inputs[1]))
            .read("dy", val(node.inputs[2]));
        if add {
            dx = dx.read("ds", val(node.inputs[3]));
        }
        dx = dx
            .write("dx", val(node.outputs[0]))
            .write("stats", stats.clone());
        let doc = std::mem::take(&mut t);
        let _ = writeln!(t, "    __shared__ float scratch[32];");
        let _ = writeln!(t, "    const long long row = blockIdx.x;");
        let _ = writeln!(t, "    if (row >= rows) return;");
        let _ = writeln!(t, "    const float* xr = x + row * {d};");
        let _ = writeln!(t, "    const float* gr = dy + row * {d};");
        let _ = writeln!(t, "    float* dxr = dx + row * {d};");
        if layer {
            let _ = writeln!(t, "    float sum = 0.0f;");
            let _ = writeln!(
                t,
                "    for (int j = threadIdx.x; j < {d}; j += blockDim.x) sum += xr[j];"
            );
            let _ = writeln!(
                t,
                "    const float mean = kiln_block_sum(sum, scratch) / {d}.0f;"
            );
            let _ = writeln!(t, "    float sq = 0.0f;");
            let _ = writeln!(t, "    for (int j = threadIdx.x; j < {d}; j += blockDim.x) {{ const float c = xr[j] - mean; sq += c * c; }}");
            let _ = writeln!(
                t,
                "    const float rstd = rsqrtf(kiln_block_sum(sq, scratch) / {d}.0f + {eps_lit});"
            );
        } else {
            let _ = writeln!(t, "    float sq = 0.0f;");
            let _ = writeln!(t, "    for (int j = threadIdx.x; j < {d}; j += blockDim.x) {{ const float v = xr[j]; sq += v * v; }}");
            let _ = writeln!(
                t,
                "    const float rstd = rsqrtf(kiln_block_sum(sq, scratch) / {d}.0f + {eps_lit});"
            );
        }
        // g = w·dy; dx = rstd·(g − mean(g) − x̂·mean(g·x̂)) for LayerNorm, rstd·(g − x̂·mean(g·x̂))
        // for RMSNorm, where x̂ = (x − mean)·rstd, or x·rstd.
        let xhat = if layer {
            "(xr[j] - mean) * rstd"
        } else {
            "xr[j] * rstd"
        };
        if layer {
            let _ = writeln!(t, "    float gsum = 0.0f, gx = 0.0f;");
        } else {
            let _ = writeln!(t, "    float gx = 0.0f;");
        }
        let _ = writeln!(
            t,
            "    for (int j = threadIdx.x; j < {d}; j += blockDim.x) {{"
        );
        let _ = writeln!(t, "        const float g = w[j] * gr[j];");
        if layer {
            let _ = writeln!(t, "        gsum += g;");
        }
        let _ = writeln!(t, "        gx += g * {xhat};");
        let _ = writeln!(t, "    }}");
        if layer {
            let _ = writeln!(
                t,
                "    const float gmean = kiln_block_sum(gsum, scratch) / {d}.0f;"
            );
        }
        let _ = writeln!(
            t,
            "    const float gxmean = kiln_block_sum(gx, scratch) / {d}.0f;"
        );
        let residual = if add {
            format!(" + ds[row * {d} + j]")
        } else {
            String::new()
        };
        let centred = if layer {
            "w[j] * gr[j] - gmean"
        } else {
            "w[j] * gr[j]"
        };
        t.push_str(&row_epilogue(
            &quantized,
            d,
            "dxr",
            &[format!("const float xhat = {xhat};")],
            &format!("rstd * ({centred} - xhat * gxmean){residual}"),
        ));
        if layer {
            let _ = writeln!(
                t,
                "    if (threadIdx.x == 0) {{ stats[2 * row] = mean; stats[2 * row + 1] = rstd; }}"
            );
        } else {
            let _ = writeln!(t, "    if (threadIdx.x == 0) stats[row] = rstd;");
        }
        let dx_base = match &quantized {
            Some((tiles, ..)) => format!("{op}_bwd_dx_d{d}_q{}", tiles.suffix()),
            None => format!("{op}_bwd_dx_d{d}"),
        };
        if let Some((_, codes, scales)) = quantized {
            dx = dx
                .param("codes", Elem::U32, Pass::Write, codes)
                .write("scales", scales);
        }
        let dx = dx.rename(dx_base).doc(doc).long("rows", rows).body(t);

        // The weight (and bias) gradient: 32 columns per block, 8 row lanes summing rows
        // strided by 8, then the lanes in a fixed order.
        let mut t = String::new();
        let _ = writeln!(
            t,
            "// The weight{} gradient of {kind_name}: dw[j] = Σ_rows dy·x̂{}, over rows of {d}.",
            if layer { " and bias" } else { "" },
            if layer { ", db[j] = Σ_rows dy" } else { "" }
        );
        let _ = writeln!(t, "// x, dy: f32[rows, {d}]; stats: f32[rows{}]; dw{}: f32[{d}]. Block: 32 columns × 8 row lanes.", if layer { ", 2" } else { "" }, if layer { ", db" } else { "" });
        let mut dw = KernelDef::new(
            format!("{kind_name}_bwd_dw_d{d}"),
            format!("{kind_name} weight gradient over rows of {d}"),
        )
        .read("x", val(node.inputs[0]))
        .read("dy", val(node.inputs[2]))
        .read("stats", stats)
        .write("dw", val(node.outputs[1]));
        if layer {
            dw = dw.write("db", val(node.outputs[2]));
        }
        let doc = std::mem::take(&mut t);
        let _ = writeln!(t, "    __shared__ float part_w[8][33];");
        if layer {
            let _ = writeln!(t, "    __shared__ float part_b[8][33];");
        }
        let _ = writeln!(
            t,
            "    const int lane = threadIdx.x % 32, group = threadIdx.x / 32;"
        );
        let _ = writeln!(t, "    const int j = blockIdx.x * 32 + lane;");
        if layer {
            let _ = writeln!(t, "    float acc_w = 0.0f, acc_b = 0.0f;");
        } else {
            let _ = writeln!(t, "    float acc_w = 0.0f;");
        }
        let _ = writeln!(t, "    if (j < {d}) {{");
        let _ = writeln!(
            t,
            "        for (long long row = group; row < rows; row += 8) {{"
        );
        let _ = writeln!(t, "            const float g = dy[row * {d} + j];");
        if layer {
            let _ = writeln!(
                t,
                "            acc_w += g * (x[row * {d} + j] - stats[2 * row]) * stats[2 * row + 1];"
            );
            let _ = writeln!(t, "            acc_b += g;");
        } else {
            let _ = writeln!(t, "            acc_w += g * x[row * {d} + j] * stats[row];");
        }
        let _ = writeln!(t, "        }}");
        let _ = writeln!(t, "    }}");
        let _ = writeln!(t, "    part_w[group][lane] = acc_w;");
        if layer {
            let _ = writeln!(t, "    part_b[group][lane] = acc_b;");
        }
        let _ = writeln!(t, "    __syncthreads();");
        let _ = writeln!(t, "    if (group == 0 && j < {d}) {{");
        let _ = writeln!(
            t,
            "        float w_sum = 0.0f{};",
            if layer { ", b_sum = 0.0f" } else { "" }
        );
        let _ = writeln!(
            t,
            "        for (int k = 0; k < 8; ++k) {{ w_sum += part_w[k][lane];{} }}",
            if layer {
                " b_sum += part_b[k][lane];"
            } else {
                ""
            }
        );
        let _ = writeln!(t, "        dw[j] = w_sum;");
        if layer {
            let _ = writeln!(t, "        db[j] = b_sum;");
        }
        let _ = writeln!(t, "    }}");
        let dw = dw.doc(doc).long("rows", rows).body(t);
        vec![
            self.work(index, dx, Grid::Blocks(rows)),
            self.work(index, dw, Grid::Blocks(d.div_ceil(32))),
        ]
    }
}
