//! Human-readable rendering of a [`Report`], and the comparison of two reports (`kiln diff`).

use std::fmt::Write;

use crate::analyze::Report;
use crate::model::PipeSchedule;
use crate::named_ops::Component;
use crate::parallel::{PerDevice, Traffic};

/// `1234567` → `1,234,567`.
pub fn group(n: u128) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// A count with a decimal SI suffix: `671.03 B`, `37.55 G`… (`B` for billions of parameters).
fn scaled(n: u128, units: &[&str; 7]) -> String {
    let x = n as f64;
    let (div, unit) = if x >= 1e18 {
        (1e18, units[6])
    } else if x >= 1e15 {
        (1e15, units[5])
    } else if x >= 1e12 {
        (1e12, units[4])
    } else if x >= 1e9 {
        (1e9, units[3])
    } else if x >= 1e6 {
        (1e6, units[2])
    } else if x >= 1e3 {
        (1e3, units[1])
    } else {
        return format!("{n} {}", units[0]);
    };
    format!("{:.2} {unit}", x / div)
}

pub fn params_h(n: u128) -> String {
    scaled(n, &["", "K", "M", "B", "T", "Q", "Qi"])
        .trim_end()
        .to_string()
}

pub fn flops_h(n: u128) -> String {
    scaled(
        n,
        &["FLOP", "KFLOP", "MFLOP", "GFLOP", "TFLOP", "PFLOP", "EFLOP"],
    )
}

/// Bytes in binary units: `68.62 KiB`, `1.31 TiB`.
pub fn bytes_h(n: u128) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut x = n as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < units.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{x:.2} {}", units[u])
    }
}

fn pct(part: u128, whole: u128) -> String {
    if whole == 0 {
        "-".to_string()
    } else {
        format!("{:.2}%", part as f64 * 100.0 / whole as f64)
    }
}

/// The report `kiln check SPEC` prints.
pub fn render(r: &Report) -> String {
    let mut o = String::new();
    let s = &r.shape;
    let _ = writeln!(
        o,
        "{} — {} layers ({} dense, {} moe), d_model {}, vocab {}",
        r.model,
        s.layers,
        s.dense_layers,
        s.moe_layers,
        s.d_model,
        group(s.vocab as u128)
    );
    let mut line = format!("  attention {} × {} heads", s.attention, s.heads);
    if s.experts > 0 {
        let _ = write!(line, " · {} routed experts, top-{}", s.experts, s.top_k);
    }
    if s.mtp_depth > 0 {
        let _ = write!(line, " · MTP depth {}", s.mtp_depth);
    }
    let _ = write!(
        line,
        " · FP8 GEMMs: {} of {} linear ops",
        s.fp8_linear_ops, s.linear_ops
    );
    let _ = writeln!(o, "{line}");

    let p = &r.params;
    let row = |o: &mut String, label: &str, n: u128, extra: String| {
        let line = format!(
            "  {label:<36}{:>28}  {:>10}  {extra}",
            group(n),
            params_h(n)
        );
        let _ = writeln!(o, "{}", line.trim_end());
    };
    let _ = writeln!(o, "\nparameters");
    row(&mut o, "total (main model)", p.total, String::new());
    row(
        &mut o,
        "active per token",
        p.active,
        format!("{} of total", pct(p.active, p.total)),
    );
    if p.mtp > 0 {
        row(&mut o, "MTP modules (own weights)", p.mtp, String::new());
    }
    for c in Component::ALL {
        match p.by_component.get(c.name()) {
            Some(&n) if n > 0 => row(
                &mut o,
                &format!("  {}", c.name().replace('_', " ")),
                n,
                pct(n, p.total),
            ),
            _ => {}
        }
    }
    if p.router_bias_buffers > 0 {
        row(
            &mut o,
            "router bias buffers (not trained)",
            p.router_bias_buffers,
            String::new(),
        );
    }

    let f = &r.flops;
    let frow = |o: &mut String, label: &str, n: u128| {
        let _ = writeln!(o, "  {label:<36}{:>28}  {:>12}", group(n), flops_h(n));
    };
    let _ = writeln!(
        o,
        "\nFLOPs per token at seq_len {}",
        group(f.seq_len as u128)
    );
    frow(&mut o, "forward", f.forward_per_token);
    frow(&mut o, "  of which attention core", f.attention_per_token);
    if f.mtp_forward_per_token > 0 {
        frow(&mut o, "MTP modules forward", f.mtp_forward_per_token);
    }
    let train_label = if f.mtp_forward_per_token > 0 {
        "training (3 × forward incl. MTP)"
    } else {
        "training (3 × forward)"
    };
    frow(&mut o, train_label, f.train_per_token);
    let m = &r.memory;
    frow(
        &mut o,
        &format!("training step, {} × {} tokens", m.batch, m.seq_len),
        f.train_per_step,
    );

    let k = &r.kv_cache;
    let _ = writeln!(o, "\nKV cache per token ({})", k.format);
    let krow = |o: &mut String, label: &str, e: u128, b: u128, extra: String| {
        let _ = writeln!(
            o,
            "  {label:<36}{:>16} elements {:>16} bytes  {extra}",
            group(e),
            group(b)
        );
    };
    krow(
        &mut o,
        "this model",
        k.elements_per_token,
        k.bytes_per_token,
        format!("({})", bytes_h(k.bytes_per_token)),
    );
    let ratio = if k.elements_per_token > 0 {
        format!(
            "{:.1}× this model",
            k.mha_elements_per_token as f64 / k.elements_per_token as f64
        )
    } else {
        String::new()
    };
    krow(
        &mut o,
        "MHA equivalent",
        k.mha_elements_per_token,
        k.mha_bytes_per_token,
        ratio,
    );
    let _ = writeln!(
        o,
        "  {:<36}{:>28}  {}",
        format!("one batch ({} × {} tokens)", m.batch, m.seq_len),
        group(k.bytes_at_batch),
        bytes_h(k.bytes_at_batch)
    );

    let _ = writeln!(
        o,
        "\ntraining memory for one step of {} × {} tokens, unsharded (bytes)",
        m.batch, m.seq_len
    );
    let mrow = |o: &mut String, label: &str, n: u128| {
        let _ = writeln!(o, "  {label:<36}{:>28}  {:>12}", group(n), bytes_h(n));
    };
    mrow(&mut o, "weights (working copies)", m.weights_bytes);
    mrow(&mut o, "master weights", m.master_bytes);
    mrow(&mut o, "gradients", m.grads_bytes);
    mrow(&mut o, "optimizer moments", m.moments_bytes);
    if m.scales_bytes > 0 {
        mrow(&mut o, "FP8 scales", m.scales_bytes);
    }
    mrow(&mut o, "activations (estimate)", m.activations_bytes);
    mrow(&mut o, "total", m.total_bytes);
    if let Some(d) = &r.per_device {
        o.push('\n');
        o.push_str(&render_per_device(d));
    }
    o
}

/// Seconds as `8.51 s` or `31.6 ms`.
pub fn seconds_h(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 1e-3 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{:.1} µs", s * 1e6)
    }
}

/// The per-device section of `kiln check`: memory of the fullest device, its traffic, and
/// the step estimate.
pub fn render_per_device(d: &PerDevice) -> String {
    let mut o = String::new();
    let l = &d.layout;
    let c = &d.cluster;
    let _ = writeln!(
        o,
        "per device: dp {} × ep {} × pp {} = {} GPUs of {} × {} ({} per node, {} each)",
        l.dp,
        l.ep,
        l.pp,
        group(l.world as u128),
        c.name,
        group(c.gpus as u128),
        c.gpus_per_node,
        bytes_h(c.memory_bytes())
    );
    let recompute = d.recompute.names();
    let _ = writeln!(
        o,
        "  schedule {}, ZeRO-{}, {} micro-batch{} of {} sequence{} per data rank, recompute {}",
        l.schedule.name(),
        l.zero,
        l.micro_batches,
        if l.micro_batches == 1 { "" } else { "es" },
        l.micro_batch,
        if l.micro_batch == 1 { "" } else { "s" },
        if recompute.is_empty() {
            "nothing".to_string()
        } else {
            recompute.join(" and ")
        }
    );
    let min = l.stage_layers.iter().min().copied().unwrap_or(0);
    let max = l.stage_layers.iter().max().copied().unwrap_or(0);
    let layers = if min == max {
        format!("{min}")
    } else {
        format!("{min}-{max}")
    };
    let stages: Vec<String> = d.stages.iter().map(u64::to_string).collect();
    let _ = writeln!(
        o,
        "  {} stage{} of {layers} layers; the fullest device holds stage{} {}",
        l.pp,
        if l.pp == 1 { "" } else { "s" },
        if stages.len() == 1 { "" } else { "s" },
        stages.join(" and ")
    );
    let m = &d.memory;
    let mrow = |o: &mut String, label: &str, n: u128| {
        let _ = writeln!(o, "  {label:<44}{:>20}  {:>12}", group(n), bytes_h(n));
    };
    let _ = writeln!(o, "\nmemory of that device (bytes)");
    let _ = writeln!(
        o,
        "  {:<44}{:>20}  {:>12}",
        "parameters held",
        group(m.params),
        params_h(m.params)
    );
    mrow(&mut o, "weights (working copies)", m.weights_bytes);
    let sharded = if l.zero == 1 { " (ZeRO-1 shard)" } else { "" };
    mrow(&mut o, &format!("master weights{sharded}"), m.master_bytes);
    mrow(&mut o, "gradients", m.grads_bytes);
    mrow(
        &mut o,
        &format!("optimizer moments{sharded}"),
        m.moments_bytes,
    );
    if m.scales_bytes > 0 {
        mrow(&mut o, "FP8 scales", m.scales_bytes);
    }
    mrow(
        &mut o,
        &format!("activations ({} micro-batches in flight)", m.in_flight),
        m.activations_bytes,
    );
    mrow(&mut o, "total", m.total_bytes);
    let verdict = if d.fits {
        format!("fits: {} free", bytes_h(m.capacity_bytes - m.total_bytes))
    } else {
        format!(
            "does not fit: {} over",
            bytes_h(m.total_bytes - m.capacity_bytes)
        )
    };
    let _ = writeln!(
        o,
        "  {:<44}{:>20}  {:>12}  {verdict}",
        "capacity",
        group(m.capacity_bytes),
        bytes_h(m.capacity_bytes)
    );

    let k = &d.comm;
    let _ = writeln!(
        o,
        "\ncommunication of that device per step (bytes sent){:>14}{:>14}",
        "NVLink", "IB"
    );
    let crow = |o: &mut String, label: &str, t: &Traffic| {
        let _ = writeln!(
            o,
            "  {label:<50}{:>14}{:>14}",
            bytes_h(t.nvlink_bytes),
            bytes_h(t.ib_bytes)
        );
    };
    crow(&mut o, "EP dispatch (all-to-all)", &k.ep_dispatch);
    crow(&mut o, "EP combine (all-to-all)", &k.ep_combine);
    if k.ep_rows_out > 0.0 {
        let _ = writeln!(
            o,
            "    {} routed token copies leave the device per step, with uniform routing",
            group(k.ep_rows_out.round() as u128)
        );
    }
    if k.remote_nodes_per_token > 0.0 {
        let routing = if k.node_limited {
            "node-limited routing"
        } else {
            "routing not node-limited"
        };
        let _ = writeln!(
            o,
            "    {routing}: {:.2} other nodes per token and MoE layer",
            k.remote_nodes_per_token
        );
    }
    if l.zero == 1 {
        crow(&mut o, "DP gradient reduce-scatter", &k.dp_grads);
        crow(&mut o, "DP weight all-gather (ZeRO-1)", &k.dp_params);
    } else {
        crow(&mut o, "DP gradient all-reduce", &k.dp_grads);
    }
    crow(&mut o, "PP sends (activations and gradients)", &k.pp_sends);

    let t = &d.time;
    let _ = writeln!(
        o,
        "\nstep estimate at {}'s peak rates (a lower bound; docs/parallel.md)",
        c.name
    );
    let trow = |o: &mut String, label: &str, v: String| {
        let _ = writeln!(o, "  {label:<50}{v:>14}");
    };
    trow(
        &mut o,
        "forward of one micro-batch, slowest stage (F)",
        seconds_h(t.forward_chunk_s),
    );
    let pace: Vec<String> = t.pace_stages.iter().map(u64::to_string).collect();
    trow(
        &mut o,
        &format!(
            "computation of the pacing device (stage{} {})",
            if pace.len() == 1 { "" } else { "s" },
            pace.join(" and ")
        ),
        seconds_h(t.compute_s),
    );
    let formula = match l.schedule {
        PipeSchedule::OneFOneB => "(PP-1)(F+B)",
        PipeSchedule::DualPipe => "(PP/2-1)(F&B+B-3W)",
    };
    trow(
        &mut o,
        "its EP and PP traffic (DualPipe overlaps it)",
        seconds_h(t.overlappable_comm_s),
    );
    trow(
        &mut o,
        &format!("pipeline bubble {formula}"),
        seconds_h(t.bubble_s),
    );
    let hidden = match l.schedule {
        PipeSchedule::OneFOneB => "its exposed communication (all of it)",
        PipeSchedule::DualPipe => "its exposed communication (DP; EP+PP past compute)",
    };
    trow(&mut o, hidden, seconds_h(t.exposed_comm_s));
    trow(&mut o, "step", seconds_h(t.step_s));
    trow(&mut o, "MFU", format!("{:.1}%", t.mfu * 100.0));
    o
}

/// How a metric is displayed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Count,
    Params,
    Flops,
    Bytes,
    /// Nanoseconds, shown in seconds.
    Nanos,
    /// Parts per million, shown as a percentage.
    Ppm,
}

/// The metrics of a report, by their stable JSON key, in report order.
pub fn metrics(r: &Report) -> Vec<(String, u128, Unit)> {
    use Unit::*;
    let mut v = vec![
        ("shape.layers".into(), r.shape.layers as u128, Count),
        ("shape.moe_layers".into(), r.shape.moe_layers as u128, Count),
        ("shape.d_model".into(), r.shape.d_model as u128, Count),
        ("shape.vocab".into(), r.shape.vocab as u128, Count),
        ("shape.heads".into(), r.shape.heads as u128, Count),
        ("shape.experts".into(), r.shape.experts as u128, Count),
        ("shape.top_k".into(), r.shape.top_k as u128, Count),
        ("shape.mtp_depth".into(), r.shape.mtp_depth as u128, Count),
        (
            "shape.fp8_linear_ops".into(),
            r.shape.fp8_linear_ops as u128,
            Count,
        ),
        ("params.total".into(), r.params.total, Params),
        ("params.active".into(), r.params.active, Params),
        ("params.mtp".into(), r.params.mtp, Params),
    ];
    for (k, n) in &r.params.by_component {
        v.push((format!("params.by_component.{k}"), *n, Params));
    }
    let f = &r.flops;
    let k = &r.kv_cache;
    let m = &r.memory;
    v.extend([
        ("flops.seq_len".into(), f.seq_len as u128, Count),
        ("flops.forward_per_token".into(), f.forward_per_token, Flops),
        (
            "flops.attention_per_token".into(),
            f.attention_per_token,
            Flops,
        ),
        (
            "flops.mtp_forward_per_token".into(),
            f.mtp_forward_per_token,
            Flops,
        ),
        ("flops.train_per_token".into(), f.train_per_token, Flops),
        ("flops.train_per_step".into(), f.train_per_step, Flops),
        (
            "kv_cache.elements_per_token".into(),
            k.elements_per_token,
            Count,
        ),
        ("kv_cache.bytes_per_token".into(), k.bytes_per_token, Bytes),
        ("kv_cache.bytes_at_batch".into(), k.bytes_at_batch, Bytes),
        ("memory.batch".into(), m.batch as u128, Count),
        ("memory.weights_bytes".into(), m.weights_bytes, Bytes),
        ("memory.master_bytes".into(), m.master_bytes, Bytes),
        ("memory.grads_bytes".into(), m.grads_bytes, Bytes),
        ("memory.moments_bytes".into(), m.moments_bytes, Bytes),
        ("memory.scales_bytes".into(), m.scales_bytes, Bytes),
        (
            "memory.activations_bytes".into(),
            m.activations_bytes,
            Bytes,
        ),
        ("memory.total_bytes".into(), m.total_bytes, Bytes),
    ]);
    if let Some(d) = &r.per_device {
        let l = &d.layout;
        let m = &d.memory;
        let c = &d.comm;
        let t = &d.time;
        let ns = |s: f64| (s * 1e9).round() as u128;
        v.extend([
            ("per_device.layout.world".into(), l.world as u128, Count),
            ("per_device.layout.dp".into(), l.dp as u128, Count),
            ("per_device.layout.ep".into(), l.ep as u128, Count),
            ("per_device.layout.pp".into(), l.pp as u128, Count),
            ("per_device.layout.zero".into(), l.zero as u128, Count),
            (
                "per_device.layout.micro_batch".into(),
                l.micro_batch as u128,
                Count,
            ),
            (
                "per_device.layout.micro_batches".into(),
                l.micro_batches as u128,
                Count,
            ),
            ("per_device.memory.params".into(), m.params, Params),
            (
                "per_device.memory.weights_bytes".into(),
                m.weights_bytes,
                Bytes,
            ),
            (
                "per_device.memory.master_bytes".into(),
                m.master_bytes,
                Bytes,
            ),
            ("per_device.memory.grads_bytes".into(), m.grads_bytes, Bytes),
            (
                "per_device.memory.moments_bytes".into(),
                m.moments_bytes,
                Bytes,
            ),
            (
                "per_device.memory.scales_bytes".into(),
                m.scales_bytes,
                Bytes,
            ),
            (
                "per_device.memory.in_flight".into(),
                m.in_flight as u128,
                Count,
            ),
            (
                "per_device.memory.activations_bytes".into(),
                m.activations_bytes,
                Bytes,
            ),
            ("per_device.memory.total_bytes".into(), m.total_bytes, Bytes),
            (
                "per_device.memory.capacity_bytes".into(),
                m.capacity_bytes,
                Bytes,
            ),
        ]);
        for (name, traffic) in [
            ("ep_dispatch", &c.ep_dispatch),
            ("ep_combine", &c.ep_combine),
            ("dp_grads", &c.dp_grads),
            ("dp_params", &c.dp_params),
            ("pp_sends", &c.pp_sends),
        ] {
            v.push((
                format!("per_device.comm.{name}.nvlink_bytes"),
                traffic.nvlink_bytes,
                Bytes,
            ));
            v.push((
                format!("per_device.comm.{name}.ib_bytes"),
                traffic.ib_bytes,
                Bytes,
            ));
        }
        v.extend([
            ("per_device.time.compute_ns".into(), ns(t.compute_s), Nanos),
            ("per_device.time.bubble_ns".into(), ns(t.bubble_s), Nanos),
            (
                "per_device.time.exposed_comm_ns".into(),
                ns(t.exposed_comm_s),
                Nanos,
            ),
            ("per_device.time.step_ns".into(), ns(t.step_s), Nanos),
            (
                "per_device.time.mfu_ppm".into(),
                (t.mfu * 1e6).round() as u128,
                Ppm,
            ),
        ]);
    }
    v
}

/// One changed metric between two reports.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Change {
    pub key: String,
    pub a: u128,
    pub b: u128,
    #[serde(skip)]
    pub unit: Unit,
}

/// The metrics that differ between `a` and `b`, in report order.
pub fn diff(a: &Report, b: &Report) -> Vec<Change> {
    let mb = metrics(b);
    metrics(a)
        .into_iter()
        .zip(mb)
        .filter(|((_, x, _), (_, y, _))| x != y)
        .map(|((key, x, unit), (_, y, _))| Change {
            key,
            a: x,
            b: y,
            unit,
        })
        .collect()
}

/// A metric's value as the report shows it (`671.03 B`, `1.31 TiB`, `8.51 s`).
pub fn human(n: u128, unit: Unit) -> String {
    match unit {
        Unit::Count => group(n),
        Unit::Params => params_h(n),
        Unit::Flops => flops_h(n),
        Unit::Bytes => bytes_h(n),
        Unit::Nanos => seconds_h(n as f64 * 1e-9),
        Unit::Ppm => format!("{:.1}%", n as f64 / 1e4),
    }
}

/// The table `kiln diff A B` prints.
pub fn render_diff(
    a_name: &str,
    b_name: &str,
    spec_changes: &[(String, String, String)],
    changes: &[Change],
) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "A: {a_name}\nB: {b_name}");
    if spec_changes.is_empty() {
        let _ = writeln!(o, "\nthe specs set the same values");
    } else {
        let _ = writeln!(o, "\nspec changes (A → B)");
        for (k, x, y) in spec_changes {
            let _ = writeln!(o, "  {k:<36} {x} → {y}");
        }
    }
    if changes.is_empty() {
        let _ = writeln!(o, "\nno reported metric changes");
        return o;
    }
    let _ = writeln!(
        o,
        "\n  {:<36}{:>16}{:>16}{:>12}",
        "metric", "A", "B", "B / A"
    );
    for c in changes {
        let ratio = if c.a == 0 {
            "new".to_string()
        } else {
            format!("{:.3}×", c.b as f64 / c.a as f64)
        };
        let _ = writeln!(
            o,
            "  {:<36}{:>16}{:>16}{:>12}",
            c.key,
            human(c.a, c.unit),
            human(c.b, c.unit),
            ratio
        );
    }
    o
}
